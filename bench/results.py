"""What `bench.load` measured, and the targets read from it: the result that its report renders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.load_client import PhaseResult
from bench.load_engine import EngineResult, KvResult, StepCost
from bench.report import Machine

MODE_LABELS = {
    "continuous": "continuous batching",
    "collect": "collect-then-run",
    "batch1": "no batching (batch 1)",
}


@dataclass(frozen=True)
class Target:
    name: str
    measured: str  # the ratio in words: what over what
    ratio: float | None  # None: not measured in this run
    bound: str  # e.g. "≥ 0.8"
    met: bool | None


@dataclass(frozen=True)
class GrpcFloor:
    """A bare grpc.aio server (Translate echoes its texts) under the closed loop: what a call costs
    before any servicer, scheduler or model work."""

    clients: int
    calls_per_s: float
    server_ms_per_call: float  # the echo server's CPU (user + system) per call
    client_ms_per_call: float  # the load generator's


@dataclass(frozen=True)
class BenchResult:
    command: str
    model: dict[str, Any]  # name, version, variant, provider, directory, threads
    corpus: str
    sentences: int
    duration_s: float
    concurrency: int
    stream_every: int
    connections: int  # the channels (TCP connections) every phase spreads its requests over
    open_fractions: list[float]
    open_repeats: int
    modes: dict[str, str]  # mode → its scheduler settings in words
    worker_server: str | None  # the worker-process server's command line in words; None: not run
    closed: list[PhaseResult]
    open: list[PhaseResult]
    engine: list[EngineResult]
    step_cost: list[StepCost]
    kv: KvResult | None
    grpc_floor: GrpcFloor | None  # None: not measured in this run
    targets: list[Target]
    minutes: float
    load_before: float
    machine: Machine


def mode_label(mode: str, workers: int = 1) -> str:
    """A mode in words, with the server's worker processes when it has several."""
    label = MODE_LABELS.get(mode, mode)
    return label if workers == 1 else f"{label}, {workers} worker processes"


def best_service(closed: Sequence[PhaseResult], texts: int) -> PhaseResult | None:
    """The closed loop the throughput target reads for calls of `texts` texts: continuous batching's
    best (the saturating one), in one process or in worker processes, whichever did better."""
    return max(
        (r for r in closed if r.mode == "continuous" and r.texts_per_call == texts),
        key=lambda r: r.output_tokens_per_s,
        default=None,
    )


def attainable_ratio(
    service: PhaseResult, engine: EngineResult, floor: GrpcFloor, cores: int
) -> float | None:
    """The most `service`'s closed loop could reach against `engine` on `cores` cores if the server's
    own per-call work cost nothing beyond grpc.aio's (`floor`), or None without the figures.

    Every call of the loop costs the server at least floor.server_ms_per_call and the load generator,
    on the same cores, what it measured per call in that loop; every output token costs what it costs
    the engine alone at its best, which used the `cores` cores: cores / engine tok/s. Then at most
    cores / (per-token cost + per-call costs / tokens per call) tokens per second. An estimate: it
    assumes perfect overlap, and a continuous batch wastes fewer steps on finished rows than the
    engine alone's fixed batches do, which can put a real server a little above it.
    """
    if not service.requests or service.client_cores is None or not engine.output_tokens_per_s:
        return None
    calls = service.requests / service.seconds
    tokens_per_call = service.output_tokens_per_s / calls
    if tokens_per_call <= 0:
        return None
    per_call_s = (floor.server_ms_per_call + 1000 * service.client_cores / calls) / 1000
    per_token_s = cores / engine.output_tokens_per_s
    return cores / (per_token_s + per_call_s / tokens_per_call) / engine.output_tokens_per_s


def open_loop_p99_ratios(opened: Sequence[PhaseResult], rate: float | None = None) -> list[float]:
    """Continuous p99 / collect p99 of each pair of open loops at `rate` (default: the first rate
    run, the target's), in the order they ran."""
    if not opened:
        return []
    rate = opened[0].offered_rate if rate is None else rate
    runs = [r for r in opened if r.offered_rate == rate and r.latency is not None]
    ratios = []
    for repeat in sorted({r.repeat for r in runs}):
        pair = {r.mode: r.latency for r in runs if r.repeat == repeat}
        cont, coll = pair.get("continuous"), pair.get("collect")
        if cont is not None and coll is not None:
            ratios.append(cont.p99 / coll.p99)
    return ratios
