"""The server: wires config → metrics → engine → scheduler → grpc.aio server, and shuts down gracefully.

    running = await start_server(config)     # listening; SERVING once the engine is warm
    await running.stop()                     # NOT_SERVING, drain, last calls refused, server.stop

`serve(config)` runs until SIGTERM or SIGINT, then stops gracefully: the health service reports
NOT_SERVING at once, new work is refused (the draining scheduler raises SchedulerClosedError →
UNAVAILABLE), in-flight calls get the grace period to finish, new calls go on being refused until
they cease, then the connections close, and it returns.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service.api.translator.v1 import translator_pb2 as pb
from service.config import Config, ConfigError, ServerConfig, resolve_parallelism, usable_cores
from service.engine.engine import (
    CUDA,
    Engine,
    ModelInfo,
    ModelSetError,
    ProviderUnavailableError,
    choose_device,
)
from service.metrics import Metrics, MetricsServer, ServedModel, register_process_metrics, serve_metrics
from service.modeldir.manifest import ModelDirectoryError
from service.rpc.auth import TokenAuth, load_tokens
from service.rpc.interceptor import CallCounter
from service.rpc.requests import request_decoder
from service.rpc.servicer import TranslatorServicer
from service.rpc.tls import ServerCertificates
from service.scheduler.pool import SchedulerPool

log = logging.getLogger(__name__)

# After the drain, a stopping server goes on refusing new calls (UNAVAILABLE, "shutting down",
# counted) until none has been in progress, started or ended for this long, and only then closes its
# connections: gRPC core cancels every call that reaches it once it has begun closing them (CANCELLED,
# no handler, not counted), until the client has read its GOAWAY. A client whose call has just ended
# sends its next one within this time (docs/reliability.md, SIGTERM under load).
LAST_CALL_QUIET_S = 0.5

SERVICE = pb.DESCRIPTOR.services_by_name["Translator"].full_name  # "translator.v1.Translator"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


# --- logging ----------------------------------------------------------------------------------------


class _TextFormatter(logging.Formatter):
    """`time level logger message k=v …`: the structured fields of a request line appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the worker and the structured fields.
    The time is RFC 3339 in UTC to the millisecond (`2026-12-03T08:17:32.793Z`), as log pipelines
    (Loki, Elasticsearch, Cloud Logging, Vector) parse it without a configured format or zone."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if hasattr(record, "worker"):
            entry["worker"] = record.worker
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class EndedCallFilter(logging.Filter):
    """gRPC's ERROR with a traceback when it cannot send the rest of a reply because the call has
    ended meanwhile (its deadline passed or its client went away between gRPC's last look and the
    send: a race inside gRPC) becomes one INFO line. A client's deadline is not a server error; the
    call's own log line (service.rpc.servicer) has its outcome. Installed on gRPC's logger by
    `start_server`."""

    LOGGER = "grpc._cython.cygrpc"
    _SAID = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith(self._SAID):
            method = record.getMessage().removeprefix(self._SAID).strip()
            record.msg, record.args = (
                "%s: the call ended before its reply was sent (deadline or client)",
                (method,),
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


_ENDED_CALLS = EndedCallFilter()


def setup_logging(config: ServerConfig, *, worker: int | None = None) -> None:
    """Root logging to stderr at the configured level, as text or JSON lines; a worker process's
    lines carry its index (`worker-1`, or `"worker": 1`)."""
    handler = logging.StreamHandler()
    if worker is not None:

        def label(record: logging.LogRecord) -> bool:
            record.worker = worker
            return True

        handler.addFilter(label)
    if config.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        who = "" if worker is None else "worker-%(worker)d "
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)


# --- the running server -----------------------------------------------------------------------------


class ListenError(OSError):
    """A port cannot be bound (gRPC or metrics); the message names the address."""


# What starting a server raises for a setup it cannot serve, as opposed to a bug: the entry point
# (service/__main__.py, service/workers.py) prints the message as one line and exits 1.
STARTUP_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,  # the TLS or token files
    ListenError,
    ModelDirectoryError,
    ModelSetError,
    ProviderUnavailableError,
)


def listen_for_metrics(registry: CollectorRegistry, server: ServerConfig) -> MetricsServer:
    """`registry` served on the metrics port (service.metrics.serve_metrics), on --metrics-host
    (default: --host)."""
    host = server.metrics_host or server.host
    try:
        return serve_metrics(registry, host.strip("[]"), server.metrics_port)
    except OSError as err:
        address = f"{host}:{server.metrics_port}"
        raise ListenError(f"cannot serve metrics on {address}: {err.strerror}") from err


def freeze_startup_objects() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach (`gc.freeze`).

    By the end of the warm-up the modules, the model's sessions and the server's structures are
    loaded for good; left tracked, every full collection walks them all with the interpreter lock
    held, stalling every request in flight (docs/gc-pauses.md). Frozen, it walks only what requests
    allocated since. Collect first, so that startup garbage is freed rather than frozen.
    """
    gc.collect()
    gc.freeze()


def describe_model(info: ModelInfo) -> str:
    """The served model in the "serving" log line (a lone server's, or the workers' supervisor's)."""
    return f"model {info.name} {info.version}, {info.variant} on {info.provider}"


def _build_version() -> str:
    try:
        return metadata.version("translator")
    except metadata.PackageNotFoundError:
        return "unknown"


def add_translator(servicer: TranslatorServicer, server: grpc.aio.Server) -> None:
    """Register translator.v1.Translator's methods as the generated add_TranslatorServicer_to_server
    does, but with request deserializers that never raise: bytes that are not a valid request (a
    corrupt wire format, a string that is not UTF-8) reach the method as an UndecodableRequest, which
    it refuses with INVALID_ARGUMENT, counted and logged like any call. The generated deserializer's
    DecodeError escaped the servicer: gRPC answered UNKNOWN and logged a traceback, uncounted."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Translator"].methods:
        assert not method.client_streaming, f"{method.name}: no client-streaming handler here"
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        kind = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=request_decoder(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


@dataclass
class RunningServer:
    """A started server: its bound ports and the pieces a graceful stop needs."""

    config: Config
    server: grpc.aio.Server
    port: int  # the bound gRPC port (the real one when the config asked for 0)
    metrics_server: MetricsServer | None  # None in a worker process: its supervisor serves /metrics
    health: health.aio.HealthServicer
    servicer: TranslatorServicer
    scheduler: SchedulerPool
    engine: Engine
    metrics: Metrics
    calls: CallCounter  # every Translator call's start and end: when stopping, when they have ceased
    certificates: ServerCertificates | None = None  # None: plaintext

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new work, let in-flight calls finish within `grace` (default: config),
        go on refusing new calls until they cease (LAST_CALL_QUIET_S, within the same `grace`), then
        close the connections (gRPC's GOAWAY: clients reconnect elsewhere)."""
        grace = self.config.server.grace_period_s if grace is None else grace
        deadline = time.monotonic() + grace
        log.info("shutting down: draining for up to %.1f s", grace)
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        self.servicer.draining = True  # new calls of every RPC: UNAVAILABLE
        drained = await self.scheduler.drain(grace)
        if not drained:
            log.warning("the grace period ended with requests still decoding; they are cancelled")
        # The connections stay open until the clients have heard "shutting down" and gone quiet:
        # once server.stop begins, gRPC core cancels a new call before any handler sees it.
        elif not await self.calls.quiet(LAST_CALL_QUIET_S, until=deadline):
            log.warning("calls still coming as the grace period ends: gRPC cancels those that arrive now")
        await self.server.stop(grace)
        self.scheduler.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("stopped")


async def start_server(
    config: Config, *, engine: Engine | None = None, worker: int | None = None, listen_when_warm: bool = False
) -> RunningServer:
    """Start listening (health NOT_SERVING), load and warm the engine up, then report SERVING.

    Args:
        engine: an already loaded engine to serve (tests share one); None loads `config.engine`.
        worker: this process's index among `config.server.workers` worker processes
            (service/workers.py): then it serves no /metrics of its own (its supervisor serves
            every worker's) and takes its share of the scheduler limits; None: a lone server.
        listen_when_warm: load and warm the engine up before listening, not after (a restarted
            worker: its siblings serve meanwhile, so no client of the shared port sees it warming up).
    Returns:
        The running server with its bound ports.
    """
    logging.getLogger(EndedCallFilter.LOGGER).addFilter(_ENDED_CALLS)  # once: the same filter
    # the TLS files and tokens checked before anything listens (ConfigError: one clear line)
    certificates = ServerCertificates.load(config.security)
    tokens = load_tokens(config.security)
    if tokens and certificates is None:
        log.warning("bearer tokens over plaintext gRPC: terminate TLS in front (docs/security.md)")
    interceptors = [TokenAuth(tokens, config.security.auth_exempt_services)] if tokens else []
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics_server = None
    if worker is None:  # a worker's metrics reach its supervisor through files (service/workers.py)
        register_process_metrics(registry)
        metrics_server = listen_for_metrics(registry, config.server)
    if engine is None:
        device = choose_device(config.engine.provider, ort.get_available_providers())
    else:  # already loaded, its threads set
        device = "cuda" if engine.model().provider == CUDA else "cpu"
    config = resolve_parallelism(config, device, usable_cores())
    if listen_when_warm and engine is None:
        assert worker is not None, "only a worker has siblings serving while it loads"
        engine = await asyncio.to_thread(Engine, config.engine, metrics)
        await asyncio.to_thread(engine.warm_up)
    # Listen first, NOT_SERVING, so that health checks and early calls get an answer (UNAVAILABLE,
    # "starting") rather than a refused connection while the model loads and warms up.
    servicer = TranslatorServicer(config, metrics)
    # The call counter first (outermost), so that it sees every call any other interceptor refuses
    # (a missing or wrong token counts as UNAUTHENTICATED), and those gRPC's concurrency bound refuses.
    counter = CallCounter(metrics, SERVICE)
    bound = config.server.max_concurrent_rpcs or None  # refused by gRPC itself beyond it
    server = grpc.aio.server(
        interceptors=[counter, *interceptors],
        options=_channel_options(config.server),
        maximum_concurrent_rpcs=bound,
    )
    add_translator(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.server.host}:{config.server.port}"
    try:
        if certificates is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, certificates.credentials())
    except RuntimeError as err:  # grpc's "Failed to bind": the reason is only in its debug log
        if metrics_server is not None:
            metrics_server.close()
        raise ListenError(f"cannot listen on {address}: in use, or not an address of this host") from err
    for name in ("", SERVICE):
        await health_servicer.set(name, NOT_SERVING)
    await server.start()
    try:
        if engine is None:
            engine = await asyncio.to_thread(Engine, config.engine, metrics)
        log.info(
            "%d scheduler instance(s), %s intra-op thread(s) per graph run",
            config.scheduler.instances,
            engine.config.intra_op_threads or "onnxruntime's default",
        )
        default, served = engine.model(), [engine.model(name) for name in engine.models]
        labels = [ServedModel(m.name, m.version, m.variant, m.provider) for m in served]
        metrics.set_model_info(labels, build_version=_build_version())
        workers = 1 if worker is None else config.server.workers
        scheduler = SchedulerPool(engine, config.scheduler, metrics, workers=workers)
        servicer.attach(engine, scheduler)
        await asyncio.to_thread(engine.warm_up)
        freeze_startup_objects()
    except BaseException:
        await server.stop(0)
        if metrics_server is not None:
            metrics_server.close()
        raise
    scheduler.start()
    servicer.ready = True
    for name in ("", SERVICE):
        await health_servicer.set(name, SERVING)
    model = describe_model(default)
    if metrics_server is None:  # a worker: its supervisor logs the line with both ports
        log.info("worker %d of %d serving on port=%d (%s)", worker, config.server.workers, port, model)
    else:
        log.info(
            "serving %s on %s port=%d metrics_port=%d (%s)",
            SERVICE,
            config.server.host,
            port,
            metrics_server.port,
            model,
        )
    return RunningServer(
        config,
        server,
        port,
        metrics_server,
        health_servicer,
        servicer,
        scheduler,
        engine,
        metrics,
        counter,
        certificates,
    )


async def serve(
    config: Config,
    *,
    worker: int | None = None,
    started: Callable[[RunningServer], None] = lambda _: None,
    orphaned: Callable[[], bool] = lambda: False,
    listen_when_warm: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully (see `RunningServer.stop`) and return.

    Args:
        worker: this process's index when it is one of several worker processes (service/workers.py).
        started: called once the server is SERVING.
        orphaned: polled every half second; True stops the server as a signal would (a worker
            whose supervisor is gone).
        listen_when_warm: see `start_server`.
    """
    running = await start_server(config, worker=worker, listen_when_warm=listen_when_warm)
    started(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if running.certificates is not None:  # SIGHUP: re-read the TLS files at the next handshake
        loop.add_signal_handler(signal.SIGHUP, running.certificates.reload)

    async def watch() -> None:
        while not orphaned():
            await asyncio.sleep(0.5)
        log.warning("the supervisor is gone: shutting down")
        stop.set()

    watcher = asyncio.create_task(watch())
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await running.stop()


def _channel_options(server: ServerConfig) -> list[tuple[str, int]]:
    size = server.max_message_bytes
    options = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]
    # Workers share one port, and the kernel spreads connections over them; a lone server refuses a
    # port that another one holds, rather than silently splitting its connections with it.
    options.append(("grpc.so_reuseport", 1 if server.workers > 1 else 0))
    return options + connection_limits(server)


def connection_limits(server: ServerConfig) -> list[tuple[str, int]]:
    """The HTTP/2 limits of ServerConfig as grpc core's channel arguments (docs/security.md).

    A call whose request never completes (HEADERS and no message, or a message cut short) holds
    its stream and never reaches a handler: no deadline of ours applies to it. The stream limit
    bounds how many one connection holds, the age and its grace how long, keepalive how long after
    the client vanished; idle connections (no call) close on their own.
    """

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options = [
        ("grpc.max_connection_age_grace_ms", ms(server.max_connection_age_grace_s)),
        ("grpc.keepalive_timeout_ms", ms(server.keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(server.min_client_ping_interval_s)),
        # a client's pings without calls are allowed (at that interval), and the server's own go
        # out without calls too, so that an idle connection to a vanished client is found dead
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    for name, value in (
        ("grpc.max_concurrent_streams", server.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", server.max_connections),
        ("grpc.max_connection_idle_ms", ms(server.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(server.max_connection_age_s)),
        ("grpc.keepalive_time_ms", ms(server.keepalive_time_s)),
    ):
        if value > 0:  # 0: the setting is off (grpc core's own default: unlimited, never)
            options.append((name, value))
    return options
