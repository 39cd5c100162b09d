"""The service's configuration: frozen dataclasses, built once from flags and environment variables.

Every setting has a command-line flag and an environment variable (`TRANSLATOR_…`); a flag wins
over its variable, a variable over the default. This is the only module that reads the
environment: `parse_config(argv, environ)` takes it as an argument and the result is passed down
(server → scheduler, engine). `config_table()` lists every setting for docs/configuration.md.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NoReturn, cast, get_args

Provider = Literal["auto", "cpu", "cuda"]
VariantChoice = Literal["auto", "fp32", "int8", "fp16", "optimized"]
KVCacheChoice = Literal["auto", "host", "device"]
SchedulerMode = Literal["continuous", "collect"]
Admission = Literal["wait", "count"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]

ENV_PREFIX = "TRANSLATOR_"


class ConfigError(ValueError):
    """A setting whose value is not allowed; the message names the flag, the variable and the choices."""


@dataclass(frozen=True)
class NamedModelDir:
    """`--model-dirs name=path`: a model directory served under a name of the operator's choosing
    instead of its manifest's (two versions of one model side by side, each under its own name)."""

    name: str  # what requests ask for
    path: Path

    def __str__(self) -> str:
        return f"{self.name}={self.path}"


@dataclass(frozen=True)
class EngineConfig:
    """What the engine loads and how onnxruntime runs it (service/engine/engine.py)."""

    # model directories: a bare path is served by its manifest's name, a NamedModelDir by its own
    model_dirs: tuple[Path | NamedModelDir, ...] = (Path("models/en-fr-small"),)
    default_model: str | None = None  # the model a request without a name gets; None: the first directory's
    provider: Provider = "auto"  # auto: CUDA when onnxruntime has it, else CPU
    variant: VariantChoice = "auto"  # auto: int8 on CPU, fp16 on CUDA, when built; else fp32
    # threads inside one graph run; 0: auto (on CPU the usable cores shared out between the scheduler
    # instances, on CUDA onnxruntime's default)
    intra_op_threads: int = 0
    # where a batch's KV cache lives between decoder steps: auto is the execution provider's memory
    # on CUDA (service/engine/device_kv_cache.py, checked against host memory at load) and host memory on CPU
    kv_cache: KVCacheChoice = "auto"


@dataclass(frozen=True)
class SchedulerConfig:
    """How requests are queued and batched (service/scheduler.py)."""

    mode: SchedulerMode = "continuous"  # continuous: iteration-level batching; collect: batch, then decode
    max_sequences: int = 64  # decoder rows in flight at most (a beam of K counts K)
    max_kv_cache_tokens: int = 65536  # self-attention cache slots over all rows in flight
    # Sentences waiting, beyond which new ones fail fast (RESOURCE_EXHAUSTED). Each sentence of each
    # text is one scheduler request, so a call of 64 one-sentence texts takes 64 places. A backstop
    # on memory: the queue is bounded in time first (admission, max_queue_wait_s).
    max_queue_size: int = 4096
    # wait: refuse at once (RESOURCE_EXHAUSTED) a request whose expected wait in the queue, from the
    # measured decode time and the live queue ahead of it, is longer than its deadline leaves or than
    # max_queue_wait_s (service/scheduler/admission.py); count: max_queue_size alone
    admission: Admission = "wait"
    max_queue_wait_s: float = 5.0  # admission wait: the longest expected queue wait accepted; 0: no bound
    max_batch_size: int = 32  # collect mode: sentences per batch at most
    max_wait_ms: float = 5.0  # collect mode: how long the first request waits for others to join
    # continuous mode: newcomers join a running batch in groups, not one by one at every step (each
    # join is an encoder call and a copy of the batch's caches). They join at once when the batch is
    # empty, when they are at least admit_ratio × the running rows, or after max_admit_delay_steps.
    admit_ratio: float = 0.25
    max_admit_delay_steps: int = 4
    # Scheduler instances, each with its own decode thread and running batch, sharing the engine's
    # sessions (Triton's instance count): onnxruntime runs them in parallel while the others do
    # their Python. The limits above are the process's, split evenly between the instances.
    # 0: auto (on CPU one per usable core, at most MAX_AUTO_INSTANCES; on CUDA one).
    instances: int = 0


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC server and its limits (service/server.py)."""

    host: str = "[::]"  # address to listen on; [::] is every interface
    port: int = 50051  # gRPC port; 0 picks a free one
    metrics_port: int = 9090  # Prometheus /metrics port; 0 picks a free one
    metrics_host: str | None = None  # address of the metrics port; None: the same as host
    grace_period_s: float = 10.0  # on shutdown, how long in-flight requests may finish
    max_message_bytes: int = 4 * 1024 * 1024  # largest request or response message
    # HTTP/2 connection limits (docs/security.md, "Connections"). Calls one connection may have open
    # at once (SETTINGS_MAX_CONCURRENT_STREAMS; 0: unlimited): a gRPC client queues calls beyond it.
    max_concurrent_streams: int = 128
    max_connections: int = 1024  # client connections open at once; more are closed at accept; 0: unlimited
    max_connection_idle_s: float = 300.0  # close a connection with no call open for this long; 0: never
    # Close client connections after this long (a GOAWAY; calls in flight get
    # max_connection_age_grace_s, then the connection is cut), so that clients balancing over DNS (a
    # headless Kubernetes Service) find new replicas, and a call whose request never completes (a
    # half-open stream) is dropped at the latest age + grace after its connection opened; 0: never.
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 30.0
    # Ping a connection silent for this long, and close it when the answer takes more than
    # keepalive_timeout_s: the calls of a vanished client are dropped within their sum.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Clients may ping at most this often (also without calls); more often, twice, and the server
    # closes the connection (GOAWAY ENHANCE_YOUR_CALM, "too_many_pings").
    min_client_ping_interval_s: float = 10.0
    # RPCs in progress at once per server process, beyond which gRPC itself refuses new ones
    # (RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!") before the servicer sees them, at a
    # fraction of its per-call CPU (the call counter, service/rpc/interceptor.py, still counts
    # them): a bound for when the event loop, not the engine, is what overload saturates
    # (docs/reliability.md). 0: none.
    max_concurrent_rpcs: int = 0
    max_texts_per_request: int = 64  # texts in one Translate request at most
    # sentences in one request at most, over all its texts: each is a request to the scheduler
    max_sentences_per_request: int = 256
    max_beam_size: int = 8  # largest beam a request may ask for
    log_level: LogLevel = "INFO"  # DEBUG, INFO, WARNING or ERROR
    log_format: LogFormat = "text"  # text for people, json for log collectors
    # Server processes sharing the port (SO_REUSEPORT; service/workers.py), each a whole server
    # with its own interpreter: gRPC's Python per-call work runs on one event loop per process, so
    # one process's calls/s reach a ceiling whatever its cores (docs/call-cost.md). The cores and the
    # scheduler limits are split evenly between the workers. A connection stays on one worker.
    workers: int = 1
    # With --workers > 1: a worker that dies after serving is restarted alone (the others keep
    # serving); more than this many restarts within WORKER_RESTART_WINDOW_S stop the server, exit 1
    # (service/workers.py). 0: any worker's death stops the server.
    worker_restarts: int = 5


WORKER_RESTART_WINDOW_S = 600.0  # the window --worker-restarts counts over


# What a request may reach without a bearer token when tokens are set: the standard health and
# reflection services (a Kubernetes gRPC probe sends no metadata).
PUBLIC_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


@dataclass(frozen=True)
class SecurityConfig:
    """TLS on the gRPC port and bearer tokens (service/rpc/tls.py, service/rpc/auth.py, docs/security.md)."""

    # Serve TLS with this certificate (PEM, the chain after it) and key, both or neither; None:
    # plaintext. The files are read again when they change (or on SIGHUP), for new connections.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: require client certificates signed by this CA
    # Bearer tokens, one per line (# comments), any of which a call must send as
    # `authorization: Bearer <token>`; with auth_tokens: either kind passes. None and (): no auth.
    auth_tokens_file: Path | None = None
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)  # environment only, never printed
    auth_exempt_services: tuple[str, ...] = PUBLIC_SERVICES  # served without a token


@dataclass(frozen=True)
class Config:
    engine: EngineConfig = EngineConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    server: ServerConfig = ServerConfig()
    security: SecurityConfig = SecurityConfig()


MAX_AUTO_INSTANCES = 4  # each instance gets a share of --max-sequences: keep the shares useful


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_parallelism(config: Config, device: str, usable_cores: int) -> Config:
    """The config with `instances` and `intra_op_threads` decided where they are 0 (auto), for one
    worker process: the usable cores are split evenly between `server.workers` first.

    On CPU: one instance per usable core (at most MAX_AUTO_INSTANCES, and fewer when the threads
    per run are set), and the cores shared out between the instances' graph runs — on 2 cores the
    engine alone decodes faster as two callers with one thread each than as one caller with two
    threads (docs/benchmarks.md, the engine-alone table). On CUDA: one instance, onnxruntime's
    default threads.
    """
    instances, threads = config.scheduler.instances, config.engine.intra_op_threads
    cores = max(1, usable_cores // max(1, config.server.workers))
    if device == "cuda":
        instances = instances or 1
    else:
        instances = instances or max(1, min(MAX_AUTO_INSTANCES, cores // max(1, threads)))
        threads = threads or max(1, cores // instances)
    return replace(
        config,
        engine=replace(config.engine, intra_op_threads=threads),
        scheduler=replace(config.scheduler, instances=instances),
    )


# --- the settings: one row per field ---------------------------------------------------------------


@dataclass(frozen=True)
class _Setting:
    section: str  # the field of Config
    field: str  # the field of that section
    flag: str  # e.g. "--model-dirs"
    meaning: str  # for --help and docs/configuration.md
    parse: Callable[[str], Any]  # text → value; raises ValueError with what is allowed
    # a secret: its environment variable only (a flag's value is in every user's `ps`), and a
    # refused value is not repeated in the error
    env_only: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.removeprefix("--").replace("-", "_").upper()

    def default(self) -> Any:
        return getattr(getattr(Config(), self.section), self.field)

    @property
    def metavar(self) -> str:
        """What --help shows as the value: the flag's last word (--max-wait-ms → MS, --port → PORT,
        --grace-period-s → SECONDS)."""
        word = self.flag.removeprefix("--").split("-")[-1]
        return "SECONDS" if word == "s" else word.upper()


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        allowed = f"an integer ≥ {low}" + (f" and ≤ {high}" if high is not None else "")
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected {allowed}") from None
        if value < low or (high is not None and value > high):
            raise ValueError(f"expected {allowed}")
        return value

    return parse


def _float_at_least(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number ≥ {low}") from None
        if not value >= low or value == float("inf"):  # also refuses nan
            raise ValueError(f"expected a finite number ≥ {low}")
        return value

    return parse


def _choice(kind: Any, *, upper: bool = False) -> Callable[[str], str]:
    allowed = cast(tuple[str, ...], get_args(kind))

    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return parse


# What a served model's name may be: it travels in requests, responses, logs and metric labels.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _model_dirs(text: str) -> tuple[Path | NamedModelDir, ...]:
    """`path` or `name=path`, comma-separated (a path with "=" in it needs a name in front)."""
    dirs: list[Path | NamedModelDir] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, equals, path = entry.partition("=")
        if not equals:
            dirs.append(Path(entry))
            continue
        name, path = name.strip(), path.strip()
        if not _MODEL_NAME.fullmatch(name) or not path:
            raise ValueError(
                f"{entry!r}: expected NAME=PATH, NAME of letters, digits, '.', '_' or '-' "
                "(at most 64, starting with a letter or digit)"
            )
        dirs.append(NamedModelDir(name, Path(path)))
    if not dirs:
        raise ValueError("expected one or more model directories (PATH or NAME=PATH), comma-separated")
    return tuple(dirs)


def _optional_name(text: str) -> str | None:
    return text.strip() or None


def _optional_path(text: str) -> Path | None:
    return Path(text.strip()) if text.strip() else None


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


MIN_TOKEN_LENGTH = 16


def _tokens(text: str) -> tuple[str, ...]:
    """Comma-separated bearer tokens: each printable ASCII without spaces, ≥ MIN_TOKEN_LENGTH long."""
    tokens = _names(text)
    if not tokens:
        raise ValueError("expected one or more tokens, comma-separated")
    check_tokens(tokens)
    return tokens


def check_tokens(tokens: Sequence[str]) -> None:
    """Raises ValueError, never naming the token, unless every token is printable ASCII without
    spaces (what an HTTP/2 header value holds) and at least MIN_TOKEN_LENGTH characters long."""
    for i, token in enumerate(tokens, 1):
        if not (token.isascii() and token.isprintable() and " " not in token):
            raise ValueError(f"token {i}: expected printable ASCII characters without spaces")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token {i}: expected at least {MIN_TOKEN_LENGTH} characters")


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty value")
    return text.strip()


_PORT = _int_at_least(0, 65535)

SETTINGS = (
    _Setting(
        "engine",
        "model_dirs",
        "--model-dirs",
        "model directories to serve, comma-separated; NAME=PATH serves one as NAME, not its manifest name",
        _model_dirs,
    ),
    _Setting("engine", "default_model", "--default-model", "model for requests naming none", _optional_name),
    _Setting("engine", "provider", "--provider", "execution provider: auto, cpu or cuda", _choice(Provider)),
    _Setting(
        "engine",
        "variant",
        "--variant",
        "model variant: auto (int8 on CPU, fp16 on CUDA), fp32, int8, fp16 or optimized",
        _choice(VariantChoice),
    ),
    _Setting(
        "engine",
        "intra_op_threads",
        "--intra-op-threads",
        "threads per graph run (0: auto, the cores shared out between instances)",
        _int_at_least(0),
    ),
    _Setting(
        "engine",
        "kv_cache",
        "--kv-cache",
        "where the KV cache lives: auto (device memory on CUDA, host on CPU), host or device",
        _choice(KVCacheChoice),
    ),
    _Setting("scheduler", "mode", "--scheduler", "batching: continuous or collect", _choice(SchedulerMode)),
    _Setting("scheduler", "max_sequences", "--max-sequences", "decoder rows in flight", _int_at_least(1)),
    _Setting(
        "scheduler",
        "max_kv_cache_tokens",
        "--max-kv-cache-tokens",
        "KV-cache slots over all rows in flight",
        _int_at_least(1),
    ),
    _Setting(
        "scheduler",
        "max_queue_size",
        "--max-queue-size",
        "sentences waiting before refusing (each sentence of each text takes a place)",
        _int_at_least(1),
    ),
    _Setting(
        "scheduler",
        "admission",
        "--admission",
        "wait: refuse when the expected queue wait exceeds the deadline's time left or "
        "--max-queue-wait-s; count: --max-queue-size alone",
        _choice(Admission),
    ),
    _Setting(
        "scheduler",
        "max_queue_wait_s",
        "--max-queue-wait-s",
        "admission wait: longest expected queue wait accepted, seconds (0: no bound)",
        _float_at_least(0.0),
    ),
    _Setting(
        "scheduler",
        "max_batch_size",
        "--max-batch-size",
        "collect mode: sentences per batch",
        _int_at_least(1),
    ),
    _Setting(
        "scheduler",
        "max_wait_ms",
        "--max-wait-ms",
        "collect mode: wait for a batch (ms)",
        _float_at_least(0.0),
    ),
    _Setting(
        "scheduler",
        "admit_ratio",
        "--admit-ratio",
        "continuous: join when waiting rows ≥ this × running rows",
        _float_at_least(0.0),
    ),
    _Setting(
        "scheduler",
        "max_admit_delay_steps",
        "--max-admit-delay-steps",
        "continuous: decoder steps a newcomer waits at most to join",
        _int_at_least(0),
    ),
    _Setting(
        "scheduler",
        "instances",
        "--instances",
        "decode loops in parallel, each with its own batch, limits split (0: auto, one per core)",
        _int_at_least(0, 64),
    ),
    _Setting("server", "host", "--host", "address to listen on", _text),
    _Setting("server", "port", "--port", "gRPC port (0: any free)", _PORT),
    _Setting("server", "metrics_port", "--metrics-port", "Prometheus /metrics port (0: any free)", _PORT),
    _Setting(
        "server",
        "metrics_host",
        "--metrics-host",
        "address of the metrics port (none: --host)",
        _optional_name,
    ),
    _Setting(
        "server",
        "grace_period_s",
        "--grace-period-s",
        "seconds in-flight requests get on shutdown",
        _float_at_least(0.0),
    ),
    _Setting(
        "server",
        "max_message_bytes",
        "--max-message-bytes",
        "largest gRPC message (bytes)",
        _int_at_least(1024),
    ),
    _Setting(
        "server",
        "max_concurrent_streams",
        "--max-concurrent-streams",
        "calls open at once on one connection (0: unlimited)",
        _int_at_least(0),
    ),
    _Setting(
        "server",
        "max_connections",
        "--max-connections",
        "client connections open at once (0: unlimited)",
        _int_at_least(0),
    ),
    _Setting(
        "server",
        "max_connection_idle_s",
        "--max-connection-idle-s",
        "close a connection without calls after this long (0: never)",
        _float_at_least(0.0),
    ),
    _Setting(
        "server",
        "max_connection_age_s",
        "--max-connection-age-s",
        "close client connections after this long (0: never)",
        _float_at_least(0.0),
    ),
    _Setting(
        "server",
        "max_connection_age_grace_s",
        "--max-connection-age-grace-s",
        "then the seconds its calls get before the connection is cut",
        _float_at_least(0.0),
    ),
    _Setting(
        "server",
        "keepalive_time_s",
        "--keepalive-time-s",
        "ping a silent connection after this long (0: never)",
        _float_at_least(0.0),
    ),
    _Setting(
        "server",
        "keepalive_timeout_s",
        "--keepalive-timeout-s",
        "close it when the ping's answer takes longer",
        _float_at_least(0.0),
    ),
    _Setting(
        "server",
        "min_client_ping_interval_s",
        "--min-client-ping-interval-s",
        "least seconds between a client's pings",
        _float_at_least(0.0),
    ),
    _Setting(
        "server",
        "max_concurrent_rpcs",
        "--max-concurrent-rpcs",
        "RPCs in progress per process before gRPC refuses new ones (0: no bound)",
        _int_at_least(0),
    ),
    _Setting(
        "server",
        "max_texts_per_request",
        "--max-texts-per-request",
        "texts per Translate request",
        _int_at_least(1),
    ),
    _Setting(
        "server",
        "max_sentences_per_request",
        "--max-sentences-per-request",
        "sentences per request, over all its texts",
        _int_at_least(1),
    ),
    _Setting(
        "server", "max_beam_size", "--max-beam-size", "largest beam a request may ask", _int_at_least(1)
    ),
    _Setting(
        "server", "log_level", "--log-level", "DEBUG, INFO, WARNING or ERROR", _choice(LogLevel, upper=True)
    ),
    _Setting("server", "log_format", "--log-format", "logs as text or json", _choice(LogFormat)),
    _Setting(
        "server",
        "workers",
        "--workers",
        "server processes sharing the port, cores and limits split between them",
        _int_at_least(1, 64),
    ),
    _Setting(
        "server",
        "worker_restarts",
        "--worker-restarts",
        f"with --workers > 1: dead workers restarted within {WORKER_RESTART_WINDOW_S:.0f} s before "
        "the server exits 1 (0: the first death stops it)",
        _int_at_least(0),
    ),
    _Setting(
        "security", "tls_cert", "--tls-cert", "TLS certificate chain, PEM (none: plaintext)", _optional_path
    ),
    _Setting("security", "tls_key", "--tls-key", "TLS private key, PEM", _optional_path),
    _Setting(
        "security",
        "tls_client_ca",
        "--tls-client-ca",
        "mutual TLS: CA of the client certificates",
        _optional_path,
    ),
    _Setting(
        "security", "auth_tokens_file", "--auth-tokens-file", "bearer tokens, one per line", _optional_path
    ),
    _Setting(
        "security", "auth_tokens", "--auth-tokens", "bearer tokens, comma-separated", _tokens, env_only=True
    ),
    _Setting(
        "security",
        "auth_exempt_services",
        "--auth-exempt-services",
        "services served without a token, comma-separated",
        _names,
    ),
)


# --- parsing ----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing and exiting (--help still exits)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def parse_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Config:
    """The configuration from command-line flags, then environment variables, then defaults.

    Args:
        argv: the flags (without the program name); None reads none.
        environ: the environment (`os.environ` at the entry point); only `TRANSLATOR_…` names are read.
    Returns:
        The configuration, every value checked.
    Raises:
        ConfigError: an unknown flag, or a value that is not allowed (the message names the flag
            or variable, the value and what is allowed).
    """
    secrets = [s for s in SETTINGS if s.env_only]
    epilog = "environment only (a flag's value is visible to every user): " + "; ".join(
        f"{s.meaning} (default: {_show(s.default())}; env {s.env})" for s in secrets
    )
    # no abbreviated flags: `--auth-tokens SECRET` would be taken for --auth-tokens-file otherwise
    parser = _Parser(
        prog="python -m service",
        description="gRPC translation inference service",
        epilog=epilog,
        allow_abbrev=False,
    )
    for s in SETTINGS:
        if s.env_only:
            continue
        parser.add_argument(
            s.flag,
            dest=s.env,
            default=None,
            metavar=s.metavar,
            help=f"{s.meaning} (default: {_show(s.default())}; env {s.env})".replace("%", "%%"),
        )
    flags = vars(parser.parse_args(list(argv or [])))
    sections: dict[str, dict[str, Any]] = {f.name: {} for f in fields(Config)}
    for s in SETTINGS:
        if flags.get(s.env) is not None:
            text, where = flags[s.env], s.flag
        elif s.env in environ:
            text, where = environ[s.env], s.env
        else:
            continue
        try:
            sections[s.section][s.field] = s.parse(text)
        except ValueError as err:
            raise ConfigError(f"{where}={'…' if s.env_only else repr(text)}: {err}") from None
    default = Config()
    return Config(**{name: replace(getattr(default, name), **values) for name, values in sections.items()})


def config_table() -> list[tuple[str, str, str, str]]:
    """(flag, environment variable, default, meaning) of every setting, for docs/configuration.md."""
    return [("(env only)" if s.env_only else s.flag, s.env, _show(s.default()), s.meaning) for s in SETTINGS]


def _show(value: Any) -> str:
    if value is None or value == ():
        return "(none)"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)
