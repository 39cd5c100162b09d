"""bench.load: a smoke test (the load generator against real in-process servers and a real
two-worker server, tiny durations, 2 clients, writing well-formed JSON and markdown), and the pieces
around it: the spread of requests over connections, the throughput target's choice of server, the
report's worker rows, the worker server's CPU reading. No timing is asserted."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.load import check_targets, main
from bench.load_client import Caller, PhaseResult, Sample, closed_loop, open_loop, warm_up
from bench.load_engine import EngineResult
from bench.load_report import render
from bench.processes import process_tree_cpu_seconds
from bench.report import Machine
from bench.results import BenchResult, GrpcFloor, attainable_ratio
from service.api.translator.v1 import translator_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.full  # ≈45 s: make test-full and CI
def test_the_benchmark_runs_end_to_end_and_writes_its_results(tmp_path: Path) -> None:
    out, js = tmp_path / "benchmarks.md", tmp_path / "benchmarks.json"
    argv = [
        "--model-dir", str(REPO / "models" / "en-fr-small"),
        "--corpus", str(REPO / "data" / "corpus" / "test.tsv"),
        "--sentences", "16",
        "--duration", "1",
        "--concurrency", "2",
        "--stream-every", "2",
        "--connections", "3",
        "--open-fraction", "0.5",
        "--open-repeats", "2",
        "--texts-per-call", "2",
        "--modes", "continuous", "collect",
        "--engine-batches", "1", "4",
        "--threads", "1",
        "--instances", "2",
        "--workers", "2",
        "--repeats", "1",
        "--skip-kv",
        "--out", str(out),
        "--json", str(js),
    ]  # fmt: skip
    assert main(argv) == 0

    result = json.loads(js.read_text())
    # continuous with the clients asked, twice as many, then 2 texts per call; the same in 2 worker
    # processes but the first; collect
    closed, more, paired, workers_more, workers_paired, collect = result["closed"]
    assert result["connections"] == 3 and "--connections 3" in result["command"]
    assert [r["workers"] for r in result["closed"]] == [1, 1, 1, 2, 2, 1]
    for worker_loop in (workers_more, workers_paired):
        assert worker_loop["mode"] == "continuous" and worker_loop["requests"] > 0
        assert worker_loop["errors"] == 0 and worker_loop["server_cores"] > 0
        assert worker_loop["engine_after"] > 0
    assert workers_more["clients"] == 4 and workers_more["streamed"] > 0
    assert workers_paired["clients"] == 2 and workers_paired["texts_per_call"] == 2
    assert "--workers 2" in result["worker_server"] and "--instances 0" in result["worker_server"]
    assert collect["mode"] == "collect" and collect["clients"] == 2
    assert paired["texts_per_call"] == 2 and paired["clients"] == 2 and paired["streamed"] == 0
    assert paired["sentences_per_s"] > 0 and paired["requests"] > 0
    assert more["mode"] == "continuous" and more["clients"] == 4
    assert closed["mode"] == "continuous" and closed["load"] == "closed" and closed["clients"] == 2
    assert closed["requests"] > 0 and closed["errors"] == 0
    assert closed["streamed"] > 0 and closed["ttft"] is not None  # every 2nd request streamed
    assert closed["output_tokens_per_s"] > 0 and closed["mean_output_tokens"] >= 1
    lat = closed["latency"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert closed["server_ttft"]["p50"] <= lat["p99"]
    assert closed["server_cores"] > 0 and closed["client_cores"] > 0

    # both modes' open loops, alternating, two runs each at the one rate
    runs = [(r["mode"], r["repeat"]) for r in result["open"]]
    assert runs == [("continuous", 0), ("collect", 0), ("continuous", 1), ("collect", 1)]
    for opened in result["open"]:
        assert opened["load"] == "open" and opened["offered_rate"] == result["open"][0]["offered_rate"] > 0
        assert opened["requests"] + opened["errors"] + opened["unfinished"] > 0

    # one caller, as many callers as instances, one caller on every core's threads
    runs = [(e["batch"], e["callers"], e["threads"]) for e in result["engine"]]
    assert runs == [(1, 1, 1), (4, 1, 1), (1, 2, 1), (4, 2, 1), (1, 1, 0), (4, 1, 0)]
    assert all(e["output_tokens"] >= e["sentences"] == 16 for e in result["engine"])
    assert result["model"]["instances"] == 2 and "--instances 2" in result["modes"]["continuous"]
    assert result["kv"] is None
    # throughput with 1 and 2 texts per call, the p99 (the median of the two pairs' ratios); no KV
    assert [t["met"] is None for t in result["targets"]] == [False, False, False, True]
    assert "2 texts per call" in result["targets"][1]["name"]
    for target in result["targets"][:2]:
        assert "(one server process)" in target["measured"] or "(2 worker processes)" in target["measured"]
    assert "median of 2 pairs" in result["targets"][2]["measured"]
    assert result["machine"]["cpu"] and result["model"]["variant"]

    page = out.read_text()
    for heading in (
        "## Targets",
        "## Service, closed loop",
        "## Service, open loop",
        "## Engine alone",
        "## Machine",
    ):
        assert heading in page
    assert "continuous batching" in page and "python -m bench.load" in page
    assert "| continuous batching, 2 worker processes | 4 clients |" in page
    assert "In 2 worker processes (`--workers 2`)" in page

    # the bare grpc.aio server's loop, with twice the clients, and what it allows
    floor = result["grpc_floor"]
    assert floor["clients"] == 4 and floor["calls_per_s"] > 0
    assert floor["server_ms_per_call"] > 0 and floor["client_ms_per_call"] > 0
    assert "The most this machine allows" in result["targets"][0]["measured"]
    assert "What these cores allow" in page and "at most about" in page


# --- the spread over connections ---------------------------------------------------------------------


class FakeChannel:
    """Stands for a grpc.aio channel: its Translate answers at once and records which channel sent
    which text."""

    def __init__(self, number: int, sent: list[tuple[int, str]]) -> None:
        self.number, self.sent = number, sent

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Any]:
        async def call(request: pb.TranslateRequest, timeout: float | None = None) -> pb.TranslateResponse:
            self.sent.append((self.number, request.texts[0]))
            return pb.TranslateResponse(translations=[pb.Translation(text="t", output_tokens=2)])

        return call

    def unary_stream(self, method: str, **_: Any) -> None:
        return None


def test_a_request_goes_on_its_connection_modulo_the_channels_and_carries_its_own_text() -> None:
    sent: list[tuple[int, str]] = []
    texts = [f"text {i}" for i in range(10)]
    caller = Caller([FakeChannel(n, sent) for n in range(3)], texts, stream_every=0)  # type: ignore[misc]

    async def calls() -> None:
        for index in range(7):
            await caller.call(index)  # by the request index: open loop, warm-up
        for index, client in [(7, 0), (8, 4), (9, 5)]:
            await caller.call(index, connection=client)  # by the client: closed loop

    asyncio.run(calls())
    assert sent == [
        *((i % 3, f"text {i}") for i in range(7)),
        (0, "text 7"),
        (1, "text 8"),
        (2, "text 9"),
    ]


class RecordingCaller:
    """Stands for a Caller: records each call's request index and connection."""

    texts_per_call = 1

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    def restart_clock(self) -> None:
        pass

    async def call(self, index: int, connection: int | None = None) -> Sample:
        self.calls.append((index, connection))
        await asyncio.sleep(0.001)
        return Sample(0.0, 0.001, 2, False, None, None, None)


def test_closed_loop_clients_keep_their_connection_and_open_loop_requests_go_by_index() -> None:
    closed = RecordingCaller()
    # every client calls at least once: it starts before the duration is over, even on a busy machine
    asyncio.run(closed_loop(closed, "continuous", clients=5, duration_s=0.5))  # type: ignore[arg-type]
    assert {connection for _, connection in closed.calls} == set(range(5))  # client c on channel c
    assert sorted(index for index, _ in closed.calls) == list(range(len(closed.calls)))

    for run in (
        lambda caller: open_loop(caller, "continuous", rate=500.0, duration_s=0.05),
        lambda caller: warm_up(caller, requests=10, concurrency=4),
    ):
        caller = RecordingCaller()
        asyncio.run(run(caller))
        assert caller.calls and all(connection is None for _, connection in caller.calls)


# --- the throughput target and the report ------------------------------------------------------------


def loop(
    clients: int, tok_s: float, *, workers: int = 1, texts: int = 1, after: float = 10_000.0
) -> PhaseResult:
    return PhaseResult(
        mode="continuous",
        load="closed",
        clients=clients,
        offered_rate=0.0,
        seconds=1.0,
        requests=100,
        errors=0,
        unfinished=0,
        streamed=0,
        sentences_per_s=tok_s / 10,
        output_tokens_per_s=tok_s,
        mean_output_tokens=10.0,
        latency=None,
        ttft=None,
        server_ttft=None,
        texts_per_call=texts,
        server_cores=1.0 + workers / 10,
        client_cores=0.2,
        engine_after=after,
        workers=workers,
    )


CLOSED = [
    loop(32, 5_000.0),
    loop(64, 6_000.0),
    loop(8, 9_000.0, texts=8, after=9_500.0),
    loop(64, 8_100.0, workers=2, after=9_000.0),  # the best with one text per call
    loop(8, 8_500.0, workers=2, texts=8),  # below one process's 9,000
    dataclasses.replace(loop(32, 5_500.0), mode="collect", engine_after=None),
]
ENGINE = [EngineResult(32, 2, 1, 256, 3_200, 0.2, 1_280.0, 16_000.0)]


def test_the_throughput_target_reads_the_best_server_and_names_it() -> None:
    single, paragraphs, *_ = check_targets(CLOSED, [], ENGINE, None)
    assert single.ratio == 8_100.0 / 9_000.0  # the worker loop, against its own engine_after
    assert "(2 worker processes)" in single.measured and "(9,000)" in single.measured
    assert paragraphs.ratio == 9_000.0 / 9_500.0
    assert "(one server process)" in paragraphs.measured and "8 texts per call" in paragraphs.name


FLOOR = GrpcFloor(clients=64, calls_per_s=3_000.0, server_ms_per_call=0.5, client_ms_per_call=0.3)


def test_the_attainable_ratio_charges_every_call_grpc_and_the_load_generator() -> None:
    # the best one-text loop: 100 calls/s, 81 output tokens per call, the load generator 0.2 cores →
    # 2 ms per call, plus the echo server's 0.5 ms; the engine: 2 cores / 16,000 tok/s per token
    best = CLOSED[3]
    want = 1 / (1 + 16_000 * 0.0025 / (81 * 2))
    assert attainable_ratio(best, ENGINE[0], FLOOR, 2) == pytest.approx(want)
    # the same per-call costs spread over ten times the tokens per call: closer to the engine
    longer = dataclasses.replace(best, output_tokens_per_s=81_000.0)
    assert want < attainable_ratio(longer, ENGINE[0], FLOOR, 2) < 1  # type: ignore[operator]
    assert attainable_ratio(dataclasses.replace(best, requests=0), ENGINE[0], FLOOR, 2) is None
    single, *_ = check_targets(CLOSED, [], ENGINE, None, FLOOR, 2)
    assert f"about {want:.2f} of the sweep's best" in single.measured
    assert "about" not in check_targets(CLOSED, [], ENGINE, None)[0].measured  # no floor: no estimate


def test_the_report_shows_the_worker_rows_and_compares_them_with_one_process() -> None:
    machine = Machine("cpu", ("avx2",), 2, 2, 0.5, "1.0", "2.0", "3.11", "Linux")
    result = BenchResult(
        command="python -m bench.load",
        model={"name": "m", "version": "1", "variant": "int8", "provider": "CPU", "directory": "d"}
        | {"intra_op_threads": 1, "instances": 2},
        corpus="`test.tsv`",
        sentences=256,
        duration_s=15.0,
        concurrency=32,
        stream_every=8,
        connections=8,
        open_fractions=[0.7],
        open_repeats=1,
        modes={"continuous": "`--scheduler continuous`", "collect": "`--scheduler collect`"},
        worker_server="`python -m service --workers 2 --port P`",
        closed=CLOSED,
        open=[],
        engine=ENGINE,
        step_cost=[],
        kv=None,
        grpc_floor=FLOOR,
        targets=check_targets(CLOSED, [], ENGINE, None, FLOOR, 2),
        minutes=1.0,
        load_before=0.5,
        machine=machine,
    )
    page = render(result)
    assert page.count("| continuous batching, 2 worker processes |") == 2
    assert "| continuous batching, 2 worker processes | 8 clients × 8 texts per call |" in page
    assert (
        "In 2 worker processes (`--workers 2`), each with an interpreter of its own, the service's best "
        "closed loops served, with one text per call, 8,100 output tok/s against one process's 6,000 "
        "(×1.35), on 1.20 server cores against 1.10; with 8 texts per call, 8,500 output tok/s against "
        "one process's 9,000 (×0.94), on 1.20 server cores against 1.10." in page
    )
    assert "used 0.500 ms of CPU per call and the load generator 0.300 ms (3,000 calls/s)" in page
    assert "one text per call (81.0 output tokens per call, the load generator 2.00 ms" in page
    assert f"at most about {1 / (1 + 16_000 * 0.0025 / (81 * 2)):.2f}, measured 0.51" in page
    # the one-process figures of the paragraph are still the one process's
    assert "with 64 clients instead of 32 it served 6,000 output tok/s instead of 5,000" in page
    assert (
        "opens 8 gRPC channels" in page and "`python -m service --workers 2 --port P` as a subprocess" in page
    )


# --- the worker server's CPU --------------------------------------------------------------------------


def test_the_process_tree_cpu_counts_a_process_and_its_descendants() -> None:
    # a child that burns 0.5 s of CPU, says how much CPU it has used, then waits
    burn = (
        "import os, sys, time\n"
        "end = time.process_time() + 0.5\n"
        "while time.process_time() < end: pass\n"
        "t = os.times(); print(t.user + t.system, flush=True)\n"
        "sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        used = float(child.stdout.readline())
        assert used >= 0.5
        assert abs(process_tree_cpu_seconds(child.pid) - used) < 0.05  # one process: its own CPU
        own = os.times()
        # this process's tree: its own CPU and the child's (and any other child's it has)
        assert process_tree_cpu_seconds(os.getpid()) >= own.user + own.system + used - 0.05
    finally:
        child.communicate("")
