"""The service under load against the engine alone: `python -m bench.load` (`make bench`).

One run, on the test sentences and one engine loaded for everything: the engine alone (library
level, no gRPC: the ceiling), the real gRPC server in each scheduler mode under closed and open
loops (continuous batching also as `python -m service --workers W`), grpc.aio's own per-call work
(`bench.call_cost`'s echo server) and the KV-cache speed-up (`bench.kv_cache`'s cell). Then it
checks the targets as ratios within the run and writes JSON and a markdown page
(`bench.load_report`), whose Method section says what each phase does (docs/benchmarks.md).
A measurement, not a test: nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cli import add_out, benchmark_parser
from bench.inputs import load_texts
from bench.load_client import DEFAULT_CONNECTIONS, Phase, PhaseResult, run_phase
from bench.load_engine import (
    KV_BATCH,
    KV_TOKENS,
    EngineResult,
    KvResult,
    measure_engine,
    measure_kv,
    measure_step_cost,
)
from bench.load_report import write_report
from bench.processes import (
    LOOPBACK_FLAGS,
    output_tail,
    process_tree_cpu_seconds,
    reserved_port,
    serving_process,
    stop_process,
    wait_serving,
)
from bench.report import describe_machine
from bench.results import (
    BenchResult,
    GrpcFloor,
    Target,
    attainable_ratio,
    best_service,
    open_loop_p99_ratios,
)
from service.config import (
    Config,
    EngineConfig,
    SchedulerConfig,
    ServerConfig,
    resolve_parallelism,
    usable_cores,
)
from service.engine.engine import Engine
from service.modeldir.tokenizer import Tokenizer
from service.server import freeze_startup_objects, start_server

DEFAULT_OUT = Path("docs/benchmarks.md")
DEFAULT_JSON = Path("docs/benchmarks.json")

# The scheduler of each mode; every other setting is the service's default.
MODES: dict[str, SchedulerConfig] = {
    "continuous": SchedulerConfig(mode="continuous"),
    "collect": SchedulerConfig(mode="collect", max_batch_size=32, max_wait_ms=20.0),
    "batch1": SchedulerConfig(mode="collect", max_batch_size=1, max_wait_ms=0.0),
}
OPEN_LOOP_MODES = ("continuous", "collect")


def mode_config(mode: str, instances: int) -> SchedulerConfig:
    return dataclasses.replace(MODES[mode], instances=instances)


def mode_flags(mode: str, instances: int, threads: int) -> list[str]:
    """The `python -m service` flags of a mode's scheduler (the settings MODES changes)."""
    s = mode_config(mode, instances)
    common = ["--instances", str(s.instances), "--intra-op-threads", str(threads)]
    if s.mode == "continuous":
        return ["--scheduler", "continuous", "--max-sequences", str(s.max_sequences), *common]
    return [
        "--scheduler",
        "collect",
        "--max-batch-size",
        str(s.max_batch_size),
        "--max-wait-ms",
        f"{s.max_wait_ms:g}",
        *common,
    ]


def mode_settings(mode: str, instances: int, threads: int) -> str:
    return "`" + " ".join(mode_flags(mode, instances, threads)) + "`"


# --- the service ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A server under load: where it listens, its worker processes, and its CPU seconds so far."""

    target: str
    workers: int
    cpu_seconds: Callable[[], float]


@asynccontextmanager
async def serving(engine: Engine, scheduler: SchedulerConfig) -> AsyncIterator[Server]:
    """The real server on 127.0.0.1 (free ports), on this event loop: its CPU is this process's."""
    server = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_period_s=2.0, log_level="WARNING")
    running = await start_server(
        Config(engine=engine.config, scheduler=scheduler, server=server), engine=engine
    )
    try:
        yield Server(f"127.0.0.1:{running.port}", 1, time.process_time)
    finally:
        await running.stop(grace=2.0)


def worker_flags(engine: EngineConfig, workers: int) -> list[str]:
    """`python -m service` flags of the worker-process server (but its port): continuous batching as
    in MODES, the engine's model and threads, `--instances 0` (auto: the cores split between the
    workers, then one instance per core), the in-process servers' grace period and log level."""
    return [
        "--workers",
        str(workers),
        *LOOPBACK_FLAGS,
        "--log-level",
        "WARNING",
        "--grace-period-s",
        "2",
        "--model-dirs",
        ",".join(str(d) for d in engine.model_dirs),
        *mode_flags("continuous", 0, engine.intra_op_threads),
    ]


@asynccontextmanager
async def serving_workers(
    engine: EngineConfig,
    workers: int,
    *,
    ready_timeout_s: float = 120.0,
    log: Callable[[str], None] = lambda _: None,
) -> AsyncIterator[Server]:
    """`python -m service --workers N` in a subprocess (`worker_flags`), yielded once every worker
    serves; then SIGTERM (every worker drains) and a wait, killed after 60 s. Its CPU: the supervisor's
    and every descendant's (the workers, multiprocessing's resource tracker)."""
    with reserved_port() as port, tempfile.TemporaryFile() as output:
        argv = [sys.executable, "-m", "service", *worker_flags(engine, workers), "--port", str(port)]
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        try:
            target = f"127.0.0.1:{port}"
            await wait_serving(target, process, output, ready_timeout_s)
            yield Server(target, workers, functools.partial(process_tree_cpu_seconds, process.pid))
        finally:
            code = await asyncio.to_thread(stop_process, process, 60.0)
            if code != 0:
                log(f"the worker server exited with code {code}:\n{output_tail(output)}")


async def measure_service(
    engine: Engine,
    texts: Sequence[str],
    *,
    modes: Sequence[str],
    duration_s: float,
    concurrency: int,
    stream_every: int,
    open_fractions: Sequence[float],
    open_repeats: int = 1,
    texts_per_call: int = 1,
    instances: int = 1,
    connections: int = DEFAULT_CONNECTIONS,
    workers: int = 0,
    seed: int = 0,
    ceiling: Callable[[], float] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[PhaseResult], list[PhaseResult]]:
    """Closed loop per mode, then the open loops of continuous and collect.

    The open-loop rates are `open_fractions` × the continuous mode's saturated closed-loop
    sentences/s (the better of its two client counts), so continuous runs first; without it there
    is no open loop. The first fraction is the target's. `ceiling()`, when given, measures the engine
    alone right after each closed loop of continuous batching. With `texts_per_call` > 1 continuous
    batching also takes a closed loop of calls carrying that many texts each. With `workers` ≥ 2,
    continuous batching's loops are followed by the same against `workers` worker processes
    (`serving_workers`): the larger client count only, the one the throughput target reads. Every
    phase spreads its requests over `connections` connections. Both modes' servers are up together
    for the open loops, which alternate between them `open_repeats` times per rate: on a shared
    machine the speed drifts, and pairs run back to back see about the same machine.
    """
    order = sorted(modes, key=list(MODES).index)
    closed: list[PhaseResult] = []
    opened: list[PhaseResult] = []
    rates: list[float] = []
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:

        async def phase(server: Server, kind: Phase, mode: str, **params: Any) -> PhaseResult | None:
            call = functools.partial(
                run_phase,
                server.target,
                list(texts),
                stream_every,
                kind,
                mode,
                connections=connections,
                **params,
            )
            cpu, wall = server.cpu_seconds(), time.perf_counter()  # the server alone: not the clients
            result = await loop.run_in_executor(clients, call)
            cores = (server.cpu_seconds() - cpu) / (time.perf_counter() - wall)
            if result is None:
                return None
            return dataclasses.replace(result, server_cores=cores, workers=server.workers)

        async def timed(server: Server, kind: Phase, mode: str, **params: Any) -> PhaseResult:
            result = await phase(server, kind, mode, **params)
            assert result is not None
            if kind == "closed" and mode == "continuous" and ceiling is not None:
                # the server idle meanwhile: the engine alone has the machine
                result = dataclasses.replace(result, engine_after=await asyncio.to_thread(ceiling))
            log(_line(result))
            return result

        async def closed_loops(
            server: Server, mode: str, client_counts: Sequence[int], several: bool
        ) -> list[PhaseResult]:
            """The warm-up, a closed loop of single-text calls per client count, then, with
            `several`, one of calls carrying `texts_per_call` texts (when > 1): as many texts in
            flight as the largest loop, fewer calls."""
            await phase(server, "warm", mode, requests=2 * concurrency, clients=concurrency)
            loops = [
                await timed(server, "closed", mode, clients=n, duration_s=duration_s) for n in client_counts
            ]
            if several and texts_per_call > 1:
                callers = max(1, max(client_counts) // texts_per_call)
                loops.append(
                    await timed(
                        server,
                        "closed",
                        mode,
                        clients=callers,
                        duration_s=duration_s,
                        texts_per_call=texts_per_call,
                    )
                )
            return loops

        for mode in order:
            continuous = mode == "continuous"
            # continuous batching also with twice the clients: saturated if the throughput does not
            # rise with them
            client_counts = [concurrency, 2 * concurrency] if continuous else [concurrency]
            async with serving(engine, mode_config(mode, instances)) as server:
                loops = await closed_loops(server, mode, client_counts, several=continuous)
            closed += loops
            if continuous:
                capacity = max(r.sentences_per_s for r in loops if r.texts_per_call == 1)
                rates = [fraction * capacity for fraction in open_fractions]
                if workers >= 2:  # the in-process server is stopped: the workers have the machine
                    log(f"starting python -m service --workers {workers}")
                    async with serving_workers(engine.config, workers, log=log) as server:
                        closed += await closed_loops(server, mode, [2 * concurrency], several=True)

        open_modes = [m for m in OPEN_LOOP_MODES if m in order]
        if rates and open_modes:
            async with contextlib.AsyncExitStack() as stack:
                servers = {
                    m: await stack.enter_async_context(serving(engine, mode_config(m, instances)))
                    for m in open_modes
                }
                for mode, server in servers.items():
                    await phase(server, "warm", mode, requests=2 * concurrency, clients=concurrency)
                for rate in rates:
                    for repeat in range(open_repeats):
                        for mode, server in servers.items():
                            result = await timed(
                                server, "open", mode, rate=rate, duration_s=duration_s, seed=seed + repeat
                            )
                            opened.append(dataclasses.replace(result, repeat=repeat))
    return closed, opened


async def measure_grpc_floor(
    texts: Sequence[str], *, clients: int, duration_s: float, connections: int = DEFAULT_CONNECTIONS
) -> GrpcFloor:
    """The closed loop of `clients` one-text unary calls (no streams: the echo server has none)
    against a bare grpc.aio server in a subprocess, after the same warm-up as the service's loops."""
    loop = asyncio.get_running_loop()
    argv = [sys.executable, "-m", "bench.call_cost", "--serve-echo"]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        async with serving_process(argv) as (target, pid):

            def phase(kind: Phase, **params: Any) -> Callable[[], PhaseResult | None]:
                return functools.partial(
                    run_phase, target, list(texts), 0, kind, "echo", connections=connections, **params
                )

            await loop.run_in_executor(pool, phase("warm", requests=2 * clients, clients=clients))
            cpu, wall = process_tree_cpu_seconds(pid), time.perf_counter()
            result = await loop.run_in_executor(pool, phase("closed", clients=clients, duration_s=duration_s))
            server_cores = (process_tree_cpu_seconds(pid) - cpu) / (time.perf_counter() - wall)
    assert result is not None and result.client_cores is not None
    if result.errors or not result.requests:
        raise RuntimeError(f"the echo server's loop failed: {result.error_codes}")
    calls = result.requests / result.seconds
    return GrpcFloor(clients, calls, 1000 * server_cores / calls, 1000 * result.client_cores / calls)


def _line(r: PhaseResult) -> str:
    load = f"closed {r.clients} clients" if r.load == "closed" else f"open {r.offered_rate:.1f}/s"
    if r.texts_per_call > 1:
        load += f" × {r.texts_per_call} texts"
    lat = r.latency
    p = f"p50 {lat.p50 * 1e3:.0f} p90 {lat.p90 * 1e3:.0f} p99 {lat.p99 * 1e3:.0f} ms" if lat else "no latency"
    mode = r.mode if r.workers == 1 else f"{r.mode} ({r.workers} workers)"
    return (
        f"{mode:>10} {load}: {r.sentences_per_s:.1f} sent/s, {r.output_tokens_per_s:.0f} tok/s, {p}, "
        f"{r.requests} ok, {r.errors} errors {r.error_codes or ''}, {r.unfinished} unfinished, "
        f"server {r.server_cores or 0:.2f} cores, clients {r.client_cores or 0:.2f}"
        + (f", engine alone right after {r.engine_after:.0f} tok/s" if r.engine_after else "")
    )


# --- targets ----------------------------------------------------------------------------------------


def server_in_words(workers: int) -> str:
    return "one server process" if workers == 1 else f"{workers} worker processes"


def check_targets(
    closed: Sequence[PhaseResult],
    opened: Sequence[PhaseResult],
    engine: Sequence[EngineResult],
    kv: KvResult | None,
    floor: GrpcFloor | None = None,
    cores: int = 0,
) -> list[Target]:
    targets = []

    ceiling = max(engine, key=lambda e: e.output_tokens_per_s, default=None)
    against = (
        f" (batch {ceiling.batch}, {ceiling.callers} caller(s), {ceiling.threads or 'all'} thread(s))"
        if ceiling
        else ""
    )
    for texts in sorted({1, *(r.texts_per_call for r in closed if r.mode == "continuous")}):
        calls = "one text per call" if texts == 1 else f"{texts} texts per call"
        service = best_service(closed, texts)
        ratio: float | None = None
        best = "continuous batching's best output tok/s under the closed loops"
        if service is not None:
            best += f" ({server_in_words(service.workers)})"
        if service is not None and service.engine_after:
            ratio = service.output_tokens_per_s / service.engine_after
            measured = (
                f"{best}, {calls} / the engine alone's output tok/s{against}, measured right after that "
                f"loop ({service.engine_after:,.0f})"
            )
            if ceiling is not None:
                swept = service.output_tokens_per_s / ceiling.output_tokens_per_s
                measured += (
                    f"; against the sweep's best below ({ceiling.output_tokens_per_s:,.0f}): {swept:.2f}"
                )
        else:
            if service is not None and ceiling is not None:
                ratio = service.output_tokens_per_s / ceiling.output_tokens_per_s
            measured = f"{best}, {calls} / the engine alone's best output tok/s{against}"
        attainable = (
            attainable_ratio(service, ceiling, floor, cores)
            if service is not None and ceiling is not None and floor is not None and cores
            else None
        )
        if attainable is not None:
            measured += (
                f". The most this machine allows a server whose own per-call work is free, with "
                f"grpc.aio's and the load generator's per-call CPU on the same {cores} cores: about "
                f"{attainable:.2f} of the sweep's best (see below)"
            )
        targets.append(
            Target(
                "service throughput vs the engine alone" + ("" if texts == 1 else f", {calls}"),
                measured,
                ratio,
                "≥ 0.8",
                None if ratio is None else ratio >= 0.8,
            )
        )

    ratios = open_loop_p99_ratios(opened)
    ratio = statistics.median(ratios) if ratios else None
    targets.append(
        Target(
            "tail latency in the open loop",
            "continuous batching's p99 latency / collect-then-run's p99 latency, same Poisson arrival "
            "rate"
            + (
                f"; median of {len(ratios)} pairs run back to back ("
                + ", ".join(f"{x:.2f}" for x in ratios)
                + ")"
                if len(ratios) > 1
                else ""
            ),
            ratio,
            "≤ 0.5",
            None if ratio is None else ratio <= 0.5,
        )
    )

    ratio = kv.speedup if kv else None
    targets.append(
        Target(
            "KV cache vs recomputing the prefix",
            f"recompute time / KV-cached time, batch {KV_BATCH} × {KV_TOKENS} output tokens",
            ratio,
            "≥ 5",
            None if ratio is None else ratio >= 5.0,
        )
    )
    return targets


# --- the command ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("bench.load", __doc__)
    parser.add_argument("--sentences", type=int, default=256, help="the first N test sentences are used")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per closed and per open loop")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--stream-every", type=int, default=8, help="every Nth request is a TranslateStream")
    parser.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        help="TCP connections every phase spreads its clients over, round-robin",
    )
    parser.add_argument(
        "--open-fraction",
        type=float,
        nargs="+",
        default=[0.7, 0.9],
        help="open-loop rates / continuous capacity (the first is the target's)",
    )
    parser.add_argument(
        "--open-repeats",
        type=int,
        default=5,
        help="open loops per rate and mode, alternating between the modes (the target: the median pair)",
    )
    parser.add_argument(
        "--texts-per-call",
        type=int,
        default=8,
        help="continuous batching also takes a closed loop of calls with this many texts (1: not)",
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads of the service (0: all cores)"
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="the service's scheduler instances (0: the server's auto choice)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="continuous batching also in `python -m service --workers N` (default: the usable cores; "
        "< 2: not)",
    )
    parser.add_argument("--engine-batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine batch and KV cell")
    parser.add_argument("--skip-kv", action="store_true", help="do not measure the KV-cache speed-up")
    parser.add_argument(
        "--skip-grpc-floor", action="store_true", help="do not measure grpc.aio's own per-call work"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the open loop's arrivals")
    add_out(parser, DEFAULT_OUT)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="the results as JSON")
    return parser


def _command(args: argparse.Namespace) -> str:
    parts = [
        "python -m bench.load",
        f"--model-dir {args.model_dir}",
        f"--corpus {args.corpus}",
        f"--sentences {args.sentences}",
        f"--duration {args.duration:g}",
        f"--concurrency {args.concurrency}",
        f"--stream-every {args.stream_every}",
        f"--connections {args.connections}",
        "--open-fraction " + " ".join(f"{f:g}" for f in args.open_fraction),
        f"--open-repeats {args.open_repeats}",
        f"--texts-per-call {args.texts_per_call}",
        "--modes " + " ".join(args.modes),
        f"--threads {args.threads}",
        f"--instances {args.instances}",
        f"--workers {args.workers}",
        "--engine-batches " + " ".join(map(str, args.engine_batches)),
        f"--repeats {args.repeats}",
        *(["--skip-kv"] if args.skip_kv else []),
        *(["--skip-grpc-floor"] if args.skip_grpc_floor else []),
        f"--seed {args.seed}",
        f"--out {args.out}",
        f"--json {args.json}",
    ]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (
        min(
            args.sentences,
            args.concurrency,
            args.repeats,
            args.open_repeats,
            args.texts_per_call,
            args.connections,
            min(args.engine_batches),
        )
        < 1
        or args.duration <= 0
    ):
        raise SystemExit(
            "--sentences, --concurrency, --repeats, --open-repeats, --texts-per-call, --connections, "
            "--engine-batches and --duration must be positive"
        )
    if min(args.open_fraction) <= 0 or min(args.stream_every, args.threads, args.instances, args.workers) < 0:
        raise SystemExit(
            "--open-fraction must be positive, --stream-every, --threads, --instances, --workers at least 0"
        )
    # 0: what the server itself would choose on this CPU with these threads
    wanted = Config(
        engine=EngineConfig(intra_op_threads=args.threads),
        scheduler=SchedulerConfig(instances=args.instances),
    )
    instances = resolve_parallelism(wanted, "cpu", usable_cores()).scheduler.instances

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    machine_before = describe_machine()
    engine = Engine(EngineConfig(model_dirs=(args.model_dir,), intra_op_threads=args.threads))
    info, graphs = engine.model(), engine.graphs()
    tokenizer = Tokenizer.from_file(graphs.model_dir / graphs.manifest.tokenizer)
    texts, origin = load_texts(args.corpus, args.sentences)
    sources = [tokenizer.encode_source(t, info.limits.max_source_tokens) for t in texts]
    log(
        f"{info.name} {info.version} ({info.variant} on {info.provider}), "
        f"{len(texts)} sentences from {origin}"
    )
    started = time.monotonic()
    # As the server does once warm: this process's long-lived objects (torch's, for the KV-cache
    # measurement, among them) stay out of the garbage collector's full collections, for the engine
    # alone as for the in-process servers, whose start would freeze them anyway.
    freeze_startup_objects()

    # The ceiling is the engine's best at library level: one caller with the service's threads,
    # as many callers as the service has instances, and one caller with every core's threads.
    engine_results = measure_engine(engine, sources, args.engine_batches, args.repeats)
    if instances > 1:
        engine_results += measure_engine(
            engine, sources, args.engine_batches, args.repeats, callers=instances
        )
    all_cores = None
    if args.threads != 0:
        all_cores = Engine(EngineConfig(model_dirs=(args.model_dir,), intra_op_threads=0))
        engine_results += measure_engine(all_cores, sources, args.engine_batches, args.repeats)
    for e in engine_results:
        log(
            f"engine batch {e.batch:>3} × {e.callers} caller(s), {e.threads or 'all'} thread(s): "
            f"{e.sentences_per_s:.1f} sent/s, {e.output_tokens_per_s:.0f} tok/s"
        )
    best = max(engine_results, key=lambda e: e.output_tokens_per_s)
    best_engine = all_cores if best.threads == 0 and all_cores is not None else engine

    def ceiling() -> float:
        """The sweep's best setting again, now: what a closed loop just run is compared with."""
        (again,) = measure_engine(best_engine, sources, [best.batch], args.repeats, callers=best.callers)
        return again.output_tokens_per_s

    closed, opened = asyncio.run(
        measure_service(
            engine,
            texts,
            modes=args.modes,
            duration_s=args.duration,
            concurrency=args.concurrency,
            stream_every=args.stream_every,
            open_fractions=args.open_fraction,
            open_repeats=args.open_repeats,
            texts_per_call=args.texts_per_call,
            instances=instances,
            connections=args.connections,
            workers=args.workers,
            seed=args.seed,
            ceiling=ceiling,
            log=log,
        )
    )
    step_cost = measure_step_cost(engine, sources, rows=32, slots=(10, 20, 40, 60))
    log("decoder step, 32 rows: " + ", ".join(f"{c.slots} slots {c.milliseconds:.2f} ms" for c in step_cost))
    kv = None
    if not args.skip_kv:
        kv = measure_kv(args.model_dir, args.corpus, args.repeats)
        log(f"KV cache batch {kv.batch} × {kv.output_tokens}: ×{kv.speedup:.1f} over recompute")
    floor = None
    if not args.skip_grpc_floor:
        floor = asyncio.run(
            measure_grpc_floor(
                texts, clients=2 * args.concurrency, duration_s=args.duration, connections=args.connections
            )
        )
        log(
            f"grpc.aio echo, {floor.clients} clients: {floor.calls_per_s:,.0f} calls/s, server "
            f"{floor.server_ms_per_call:.3f} ms and load generator {floor.client_ms_per_call:.3f} ms "
            "CPU per call"
        )
    targets = check_targets(closed, opened, engine_results, kv, floor, usable_cores())
    for t in targets:
        verdict = "not measured" if t.met is None else ("met" if t.met else "NOT met")
        log(f"target {t.name}: {'-' if t.ratio is None else f'{t.ratio:.2f}'} ({t.bound}) {verdict}")

    result = BenchResult(
        command=_command(args),
        model={
            "name": info.name,
            "version": info.version,
            "variant": info.variant,
            "provider": info.provider,
            "directory": str(info.directory),
            "intra_op_threads": args.threads,
            "instances": instances,
        },
        corpus=origin,
        sentences=len(texts),
        duration_s=args.duration,
        concurrency=args.concurrency,
        stream_every=args.stream_every,
        connections=args.connections,
        open_fractions=args.open_fraction,
        open_repeats=args.open_repeats,
        modes={m: mode_settings(m, instances, args.threads) for m in args.modes},
        worker_server=(
            "`python -m service " + " ".join(worker_flags(engine.config, args.workers)) + " --port P`"
            if any(r.workers > 1 for r in closed)
            else None
        ),
        closed=closed,
        open=opened,
        engine=engine_results,
        step_cost=step_cost,
        kv=kv,
        grpc_floor=floor,
        targets=targets,
        minutes=(time.monotonic() - started) / 60,
        load_before=machine_before.load,
        machine=describe_machine(),
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False) + "\n")
    write_report(args.out, result)
    log(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
