"""Benchmark servers as subprocesses: a reserved port, start until SERVING, stop, CPU and memory of
the tree.

Every benchmark that runs `python -m service` (or the bare echo server) beside its load generator
uses these, so that the servers are started, waited for and measured the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load_client import OWN_CONNECTION

# A server is ready once this many health checks in a row, each on a connection of
# its own, said SERVING (see `wait_serving`).
READY_CHECKS = 24


LOOPBACK_FLAGS = ("--host", "127.0.0.1", "--metrics-port", "0")  # gRPC on loopback, metrics on a free port


def service_argv(*flags: str) -> list[str]:
    """`python -m service` with LOOPBACK_FLAGS, then `flags` (not `--port`: `serving_process`
    appends it)."""
    return [sys.executable, "-m", "service", *LOOPBACK_FLAGS, *flags]


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A free port on 127.0.0.1, held by a socket bound with SO_REUSEPORT (never listening) until the
    block ends: no other program can take it meanwhile, while the worker server's supervisor, whose
    own reservation also sets SO_REUSEPORT, and its workers can bind it too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@asynccontextmanager
async def serving_process(argv: list[str]) -> AsyncIterator[tuple[str, int]]:
    """Start `argv` (completed with `--port P`) as a subprocess on 127.0.0.1, yield its target and
    pid once it serves, stop it (SIGTERM) at the end."""
    with reserved_port() as port:
        pass  # a free port, released: a lone `python -m service` refuses one another socket holds
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen([*argv, "--port", str(port)], stdout=output, stderr=subprocess.STDOUT)
        try:
            target = f"127.0.0.1:{port}"
            await wait_serving(target, process, output, 120.0)
            yield target, process.pid
        finally:
            stop_process(process, 30.0)


async def wait_serving(
    target: str, process: subprocess.Popen[bytes], output: IO[bytes], timeout_s: float
) -> None:
    """Until READY_CHECKS health checks (`grpc.health.v1`, service "") in a row say SERVING; raises
    RuntimeError with the server's last output if it exits or `timeout_s` passes first.

    Health is each worker's own and the kernel hands each connection to one worker, so every check
    opens a connection of its own: a worker not yet serving escapes READY_CHECKS of them with a
    chance of ((W − 1)/W)^24 (2^-24 with 2 workers). The warm-up calls follow anyway."""
    deadline = time.monotonic() + timeout_s
    in_a_row = 0
    while in_a_row < READY_CHECKS:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}:\n{output_tail(output)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not serving after {timeout_s:g} s:\n{output_tail(output)}")
        if await _health_serving(target):
            in_a_row += 1
        else:
            in_a_row = 0
            await asyncio.sleep(0.2)


async def _health_serving(target: str) -> bool:
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5.0
            )
        except grpc.aio.AioRpcError:  # not listening yet (UNAVAILABLE), or slow to answer
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """SIGTERM, then its exit code; killed when it has not exited within `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def output_tail(output: IO[bytes], chars: int = 4000) -> str:
    """The last `chars` bytes written to `output`, read without moving its offset (the subprocess
    writes through the same open file)."""
    size = os.fstat(output.fileno()).st_size
    start = max(0, size - chars)
    return os.pread(output.fileno(), size - start, start).decode(errors="replace")


def process_tree(pid: int) -> Iterator[int]:
    """`pid` and every descendant alive now (Linux /proc); a process gone meanwhile is skipped."""
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        yield current
        for task in tasks:  # a child is listed under the thread that started it
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                pending += [int(child) for child in (task / "children").read_text().split()]


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) used so far by process `pid` and every descendant
    alive now, from /proc (Linux): the worker server's CPU is spread over several processes."""
    ticks = 0
    for current in process_tree(pid):
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        # after the command name, in parentheses and free to hold spaces: field 3 onwards; utime and
        # stime are fields 14 and 15
        fields = stat.rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree_memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, the sum of each process's peak resident bytes) of process `pid` and every
    descendant alive now, from /proc/*/status (VmRSS, VmHWM; Linux). Pages shared between the
    processes count once per process."""
    resident = peak = 0
    for current in process_tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        kib = {
            k: int(v.split()[0])
            for k, _, v in (line.partition(":") for line in status.splitlines())
            if k in ("VmRSS", "VmHWM")
        }
        resident += 1024 * kib.get("VmRSS", 0)
        peak += 1024 * kib.get("VmHWM", 0)
    return resident, peak
