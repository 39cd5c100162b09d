"""`python -m service --workers 2`: real worker processes sharing one port, metrics added up by the
supervisor, SIGTERM drained by every worker, a dead worker taking the server down with it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
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
        pids = [int(pid) for pid in children.split()]
        return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "service", "--workers", "2", "--host", "127.0.0.1", "--port", "0"]
    argv += ["--metrics-port", "0", "--grace-period-s", "20", "--log-format", "json"]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:

        def serving() -> tuple[int, int] | None:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            match = re.search(r"port=(\d+) metrics_port=(\d+) \(2 workers", log.read_text())
            return (int(match.group(1)), int(match.group(2))) if match else None

        port, metrics_port = wait_for("both workers to serve", serving)
        running = Supervisor(process, log, port, metrics_port)
        workers = running.workers()
        assert len(workers) == 2
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    # however the supervisor ended, its workers end too (a killed one's: when they notice)
    wait_for("the workers to exit", lambda: not any(alive(pid) for pid in workers) or None, 60)


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


def test_a_worker_that_dies_stops_the_server(supervisor: Supervisor) -> None:
    first, second = supervisor.workers()
    os.kill(first, signal.SIGKILL)
    assert supervisor.process.wait(timeout=60) == 1
    assert not alive(second)
    messages = [str(line.get("message")) for line in supervisor.lines()]
    assert any("exited with code -9" in m for m in messages)
    assert any("draining for up to" in m for m in messages)  # the other one stopped gracefully


def test_workers_of_a_killed_supervisor_stop_on_their_own(supervisor: Supervisor) -> None:
    workers = supervisor.workers()
    supervisor.process.kill()
    supervisor.process.wait()
    wait_for("the orphaned workers to exit", lambda: not any(alive(pid) for pid in workers) or None, 30)


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
