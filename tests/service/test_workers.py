"""`python -m service --workers 2`: real worker processes sharing one port, metrics added up by the
supervisor, SIGTERM drained by every worker, a killed worker restarted under load with no call lost,
a crash loop stopping the server, start-up errors printed as one line."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.client.client import SERVICE_CONFIG
from service.config import SchedulerConfig

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The old man gives the red book to the child."
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Supervisor:
    process: subprocess.Popen[bytes]
    log: Path
    port: int
    metrics_port: int

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def metrics(self) -> dict[str, float]:
        """Every sample of the supervisor's /metrics, keyed `name{label="value",…}` (labels sorted)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples

    def workers(self) -> list[int]:
        """The worker processes' pids (not multiprocessing's resource tracker, also a child)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(pid) for pid in children.split() if b"spawn_main" in _cmdline(int(pid))]


def _cmdline(pid: int) -> bytes:
    """A process's command line; empty once it has exited (a zombie's, or one already reaped)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


@pytest.fixture
def supervisor(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Supervisor]:
    """`python -m service --workers 2` on loopback, SERVING; more flags by indirect parametrization
    (`--workers 1` among them: one process, no supervisor)."""
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "service", "--workers", "2", "--host", "127.0.0.1", "--port", "0"]
    argv += ["--metrics-port", "0", "--grace-period-s", "20", "--log-format", "json"]
    argv += getattr(request, "param", [])
    workers = int(argv[len(argv) - 1 - argv[::-1].index("--workers") + 1])  # the last one counts
    spawned: set[int] = set()
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:

        def serving() -> tuple[int, int] | None:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            match = re.search(r"port=(\d+) metrics_port=(\d+) \(", log.read_text())
            return (int(match.group(1)), int(match.group(2))) if match else None

        port, metrics_port = wait_for("every worker to serve", serving)
        running = Supervisor(process, log, port, metrics_port)
        spawned.update(running.workers())
        assert len(spawned) == (workers if workers > 1 else 0)
        yield running
        if process.poll() is None:
            spawned.update(running.workers())  # restarted ones too
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    # however the supervisor ended, its workers end too (a killed one's: when they notice)
    wait_for("the workers to exit", lambda: not any(alive(pid) for pid in spawned) or None, 60)


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def own_channel(port: int) -> grpc.Channel:
    # A connection of its own (channels otherwise share one per target): the kernel picks a worker
    # per connection.
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def translate(channel: grpc.Channel, text: str, **stopping: int) -> pb.TranslateResponse:
    options = pb.TranslateOptions(stopping=pb.StoppingCriteria(**stopping)) if stopping else None
    request = pb.TranslateRequest(texts=[text], options=options)
    response: pb.TranslateResponse = pb_grpc.TranslatorStub(channel).Translate(request, timeout=60)
    return response


def test_workers_share_the_port_and_their_metrics_add_up(supervisor: Supervisor) -> None:
    calls = 24
    outputs = []
    for _ in range(calls):
        with own_channel(supervisor.port) as channel:
            outputs.append(translate(channel, TEXT).translations[0].text)
    assert len(set(outputs)) == 1 and outputs[0]  # the same model in every worker

    served = [line for line in supervisor.lines() if line.get("message") == "Translate OK"]
    assert len(served) == calls
    # 24 connections, each to either worker: all on one would happen once in ~8 million runs.
    assert {line["worker"] for line in served} == {0, 1}

    metrics = supervisor.metrics()
    assert metrics['translator_requests_total{code="OK",rpc="Translate"}'] == calls
    input_tokens = sum(int(str(line["input_tokens"])) for line in served)
    assert metrics["translator_input_tokens_total{}"] == input_tokens
    assert metrics["translator_sequences_in_flight{}"] == 0
    # the gauges are the live workers' sum: the server's configured capacity, split in two
    assert metrics["translator_kv_cache_capacity_tokens{}"] == SchedulerConfig().max_kv_cache_tokens
    info = [v for k, v in metrics.items() if k.startswith("translator_model_info{")]
    assert info == [1.0]


def test_sigterm_drains_every_worker_and_exits_zero(supervisor: Supervisor) -> None:
    channels = [own_channel(supervisor.port) for _ in range(6)]
    try:
        stopping = pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=120)
        request = pb.TranslateStreamRequest(text=TEXT, options=pb.TranslateOptions(stopping=stopping))
        streams = [pb_grpc.TranslatorStub(c).TranslateStream(request, timeout=60) for c in channels]
        for stream in streams:
            next(stream)  # accepted and decoding
        supervisor.process.send_signal(signal.SIGTERM)
        for stream in streams:
            final = [m.final for m in stream if m.HasField("final")]
            assert len(final) == 1 and final[0].translations[0].output_tokens >= 120
    finally:
        for channel in channels:
            channel.close()
    assert supervisor.process.wait(timeout=60) == 0
    drained = [line for line in supervisor.lines() if "draining for up to" in str(line.get("message"))]
    assert sorted(int(str(line["worker"])) for line in drained) == [0, 1]


@dataclass(frozen=True)
class Ended:
    """One call of a client, as it saw it."""

    rpc: str
    code: str
    details: str
    before_signal: bool  # started before SIGTERM was sent
    accepted: bool  # a stream whose first message arrived before SIGTERM was sent


@pytest.mark.parametrize(
    "supervisor", [["--workers", "1"], ["--workers", "2"]], indirect=True, ids=["1 worker", "2 workers"]
)
def test_sigterm_under_a_closed_loop_of_clients_loses_no_call(supervisor: Supervisor) -> None:
    """SIGTERM while 8 clients, each on a connection of its own, call back to back (unary calls of
    1–8 texts, streams of 30+ tokens): every call ends OK or UNAVAILABLE (refused once the drain has
    begun, also after it: none CANCELLED), every stream accepted before the signal ends OK, none is
    lost, the server exits 0, and the client's calls by (rpc, code) equal the server's own log lines
    of them."""
    clients, signalled = 8, threading.Event()
    started, ended = [0] * clients, [[] for _ in range(clients)]  # type: list[int], list[list[Ended]]
    stopping = pb.StoppingCriteria(min_output_tokens=30)

    def call(stub: pb_grpc.TranslatorStub, number: int, texts: list[str]) -> tuple[str, bool]:
        """The rpc made, and whether it was a stream accepted before the signal."""
        if number % 2:
            request = pb.TranslateStreamRequest(text=texts[0], options=pb.TranslateOptions(stopping=stopping))
            stream = stub.TranslateStream(request, timeout=60)
            next(stream)
            accepted = not signalled.is_set()
            assert [m for m in stream if m.HasField("final")]
            return "TranslateStream", accepted
        stub.Translate(pb.TranslateRequest(texts=texts), timeout=60)
        return "Translate", False

    def client(number: int) -> None:
        texts = [TEXT, "I love cats.", "We see a small dog.", "The child reads a book."] * 2
        with own_channel(supervisor.port) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            while True:  # until the server refuses a call: it is draining, or gone
                before, accepted = not signalled.is_set(), False
                started[number] += 1
                some = texts[: 1 + (started[number] % 8)]
                rpc = "TranslateStream" if number % 2 else "Translate"
                try:
                    rpc, accepted = call(stub, number, some)
                    ended[number].append(Ended(rpc, "OK", "", before, accepted))
                except grpc.RpcError as err:
                    details = str(err.details())  # type: ignore[attr-defined]
                    ended[number].append(Ended(rpc, err.code().name, details, before, accepted))  # type: ignore[attr-defined]
                    if err.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                        return

    def in_flight() -> bool | None:
        return supervisor.metrics()["translator_sequences_in_flight{}"] > 0 or None

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    try:
        wait_for("three calls of every client", lambda: all(len(calls) >= 3 for calls in ended) or None)
        wait_for("calls in flight", in_flight)
    finally:
        supervisor.process.send_signal(signal.SIGTERM)
        signalled.set()
        for thread in threads:
            thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    calls = [call for calls in ended for call in calls]
    assert len(calls) == sum(started)  # none lost
    # A call that reached a worker once it had begun closing its connections would be cancelled by
    # gRPC core (CANCELLED, no handler, not counted): each worker refuses new calls "shutting down"
    # until its clients have gone quiet, and only then closes (docs/reliability.md, SIGTERM under load).
    assert {call.code for call in calls} <= {"OK", "UNAVAILABLE"}, [c for c in calls if c.code != "OK"]
    accepted = [call for call in calls if call.accepted]
    assert accepted and all(call.code == "OK" for call in accepted)
    assert supervisor.process.wait(timeout=60) == 0
    # the client's count of each outcome equals the server's log lines of it; a call refused by the
    # network (its connection closed after the drain, a new one no longer accepted) never reached a
    # handler
    logged = collections.Counter(
        str(line["message"])
        for line in supervisor.lines()
        if re.fullmatch(r"\w+ [A-Z_]+", str(line["message"]))
    )
    drained = [c for c in calls if c.code == "UNAVAILABLE" and "shutting down" in c.details]
    seen = collections.Counter(f"{c.rpc} {c.code}" for c in calls if c.code == "OK" or c in drained)
    assert logged == seen
    unreached = [c for c in calls if c.code == "UNAVAILABLE" and c not in drained]
    assert all(not c.before_signal and "failed to connect" in c.details for c in unreached), unreached


def retrying_channel(port: int) -> grpc.Channel:
    """A connection of its own with the client library's service config (retries UNAVAILABLE)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 1)]
    options.append(("grpc.service_config", SERVICE_CONFIG))
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def restarted_worker(supervisor: Supervisor, victim: int, survivor: int) -> int:
    """The pid of the worker the supervisor spawned in place of `victim` (not serving yet, maybe)."""

    def spawned() -> int | None:
        return next((p for p in supervisor.workers() if p not in (victim, survivor)), None)

    return wait_for("the restarted worker", spawned)


def test_a_killed_worker_is_restarted_under_load_and_no_call_is_lost(supervisor: Supervisor) -> None:
    """kill -9 one worker while clients keep calls in flight on both: the supervisor restarts it,
    the other one serves on, the retry policy carries every call (0 lost), counters never go back."""
    clients, stop = 4, threading.Event()
    ok, failed = [0] * clients, [[] for _ in range(clients)]  # type: list[int], list[list[str]]
    # ~30-token outputs: calls are in flight most of the time, on every client's connection.
    stopping = pb.StoppingCriteria(min_output_tokens=30)
    request = pb.TranslateRequest(texts=[TEXT], options=pb.TranslateOptions(stopping=stopping))

    def client(i: int) -> None:
        while not stop.is_set():  # a fresh connection per call: calls spread over both workers
            with retrying_channel(supervisor.port) as channel:
                try:
                    pb_grpc.TranslatorStub(channel).Translate(request, timeout=60)
                    ok[i] += 1
                except grpc.RpcError as err:
                    failed[i].append(f"{err.code()}: {err.details()}")

    def served_by(worker: int) -> int:
        lines = supervisor.lines()
        return sum(1 for line in lines if line.get("message") == "Translate OK" and line["worker"] == worker)

    def restart_line() -> re.Match[str] | None:
        messages = (str(line.get("message")) for line in supervisor.lines())
        return next(
            filter(None, (re.match(r"worker (\d) \(pid \d+\) restarted and serving", m) for m in messages)),
            None,
        )

    def in_flight() -> bool | None:
        return supervisor.metrics()["translator_sequences_in_flight{}"] > 0 or None

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        wait_for("both workers to serve calls", lambda: (served_by(0) > 0 and served_by(1) > 0) or None)
        wait_for("calls in flight", in_flight)
        before = supervisor.metrics()['translator_requests_total{code="OK",rpc="Translate"}']
        victim, survivor = supervisor.workers()
        os.kill(victim, signal.SIGKILL)
        restarted_worker(supervisor, victim, survivor)
        index = int(wait_for("the restarted worker to serve", restart_line).group(1))
        served_before = served_by(index)
        wait_for("calls on the restarted worker", lambda: served_by(index) > served_before or None)
        assert alive(survivor)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert [f for f in failed if f] == []  # 0 lost
    assert supervisor.process.poll() is None
    metrics = supervisor.metrics()
    counted = metrics['translator_requests_total{code="OK",rpc="Translate"}']
    # The dead worker's counts stay in the sum. A call answered just as the worker died, whose
    # answer never reached its client, is retried and counted twice: at most one per client.
    assert counted >= before
    assert sum(ok) <= counted <= sum(ok) + clients
    assert metrics["translator_sequences_in_flight{}"] == 0  # the dead worker's gauges left the sum
    messages = [str(line.get("message")) for line in supervisor.lines()]
    assert any(
        re.match(rf"worker {index} \(pid {victim}\) exited with code -9: restarting it", m) for m in messages
    )


def test_json_log_lines_carry_an_rfc_3339_utc_time(supervisor: Supervisor) -> None:
    lines = supervisor.lines()
    assert {line.get("worker") for line in lines} >= {None, 0, 1}  # the supervisor's and the workers'
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["time"])), line


@pytest.mark.parametrize("supervisor", [["--worker-restarts", "1"]], indirect=True)
def test_a_crash_loop_stops_the_server(supervisor: Supervisor) -> None:
    victim, survivor = supervisor.workers()
    os.kill(victim, signal.SIGKILL)  # restart 1 of 1
    os.kill(restarted_worker(supervisor, victim, survivor), signal.SIGKILL)  # one death too many
    assert supervisor.process.wait(timeout=90) == 1
    assert not alive(survivor)
    messages = [str(line.get("message")) for line in supervisor.lines()]
    assert any("exited with code -9: restarting it (restart 1 of 1 allowed" in m for m in messages)
    assert any(
        "after 1 restarts within 600 s (--worker-restarts 1): stopping the server" in m for m in messages
    )
    assert any("draining for up to" in m for m in messages)  # the survivor stopped gracefully


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_a_clear_error(workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in (
            ["--port", str(port), "--metrics-port", "0"],
            ["--port", "0", "--metrics-port", str(port)],
        ):
            argv = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--workers", str(workers), *flags]
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert done.returncode == 1
            last = done.stderr.splitlines()[-1]  # (grpc logs its own line before it)
            assert re.fullmatch(
                rf"python -m service: cannot (listen|serve metrics) on 127.0.0.1:{port}: .+", last
            )


def tampered_model(tmp_path: Path) -> Path:
    """The committed model's fp32 directory (files linked) with one byte added to its tokenizer."""
    source, out = ROOT / "models" / "en-fr-small", tmp_path / "tampered"
    out.mkdir()
    for file in [*json.loads((source / "manifest.json").read_text())["files"], "manifest.json"]:
        (out / file).symlink_to(source / file)
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes() + b" ")
    return out


STARTUP_ERRORS = {
    "missing manifest": (
        lambda tmp: ["--model-dirs", str(tmp / "nowhere")],
        r"nowhere/manifest.json: missing",
    ),
    "checksum mismatch": (
        lambda tmp: ["--model-dirs", str(tampered_model(tmp))],
        r"tampered/tokenizer.json: checksum mismatch",
    ),
    "duplicate name": (
        lambda tmp: ["--model-dirs", "models/en-fr-small,models/en-fr-small"],
        r"model name 'en-fr-small' is already served .*NAME=PATH",
    ),
    "unknown default": (
        lambda tmp: ["--default-model", "nope"],
        r"default model 'nope' .* not among en-fr-small",
    ),
    "cuda without CUDA": (lambda tmp: ["--provider", "cuda"], r"provider 'cuda' was asked for .*only .*CPU"),
}


@pytest.mark.parametrize(
    ("problem", "workers"),
    [(p, 1) for p in STARTUP_ERRORS] + [("missing manifest", 2), ("duplicate name", 2)],
)
def test_a_startup_error_is_one_line_and_exit_1(problem: str, workers: int, tmp_path: Path) -> None:
    flags, expected = STARTUP_ERRORS[problem]
    argv = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    argv += ["--workers", str(workers), *flags(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("python -m service:")]
    assert re.search(expected, line), line
