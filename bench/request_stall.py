"""Whether one huge request stalls the server: `python -m bench.request_stall`.

Starts `python -m service` (from `--root`, a checkout: this one, or an older one to compare) on
127.0.0.1 and, while 4 client threads send small Translate calls ("I love cats.") in a closed
loop, sends one large call of each kind below and measures how long it takes to be answered and
how long the small calls that overlapped it took. Prints a markdown table with the machine, for
docs/reliability.md. A measurement, not a test.

- 4 MB text: `"a" * 4_000_000` in one Translate (refused INVALID_ARGUMENT);
- 4 MB target_prefix, 4 MB Attend target: the same, in other fields;
- largest legal: 255 sentences of 127 tokens and 1,611 characters each (the most characters a
  sentence of this model can have), then one of 1,777 characters and 889 tokens: refused once
  the 255 before it are split and tokenised (≈412,000 characters).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc

from bench.processes import service_argv, serving_process
from bench.report import describe_machine, machine_table
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc

SMALL = pb.TranslateRequest(texts=["I love cats."])
CLIENTS = 4
HUGE = "a" * 4_000_000
_SENTENCE = ("grandmothers " * 124).strip()  # 1,611 characters, 127 tokens: as long as a sentence gets
# 255 sentences that fit, then one of as many characters that does not (889 tokens): refused
# only once every sentence before it has been tokenised
_LARGEST = "\n".join([_SENTENCE] * 255 + ["a " * 889])
CASES: dict[str, Callable[[pb_grpc.TranslatorStub], object]] = {
    "Translate, 4 MB text": lambda s: s.Translate(pb.TranslateRequest(texts=[HUGE]), timeout=120),
    "Translate, 4 MB target_prefix": lambda s: s.Translate(
        pb.TranslateRequest(texts=["Hi."], options=pb.TranslateOptions(target_prefix=HUGE)), timeout=120
    ),
    "Attend, 4 MB target": lambda s: s.Attend(pb.AttendRequest(source="Hi.", target=HUGE), timeout=120),
    "Translate, 255 sentences tokenised, then refused": lambda s: s.Translate(
        pb.TranslateRequest(texts=[_LARGEST]), timeout=120
    ),
}


def _timed(call: Callable[[], object]) -> tuple[float, float, str]:
    """(start, end, status code name) of one call."""
    start = time.perf_counter()
    try:
        call()
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    return start, time.perf_counter(), code


def measure(stub: pb_grpc.TranslatorStub, big: Callable[[], object]) -> tuple[float, str, list[float]]:
    """The big call's seconds and code, and the seconds of every small call that overlapped it."""
    stop, started = threading.Event(), threading.Barrier(CLIENTS + 1)
    small: list[tuple[float, float, str]] = []

    def client() -> None:
        started.wait()
        while not stop.is_set():
            small.append(_timed(lambda: stub.Translate(SMALL, timeout=120)))

    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(CLIENTS):
            pool.submit(client)
        started.wait()
        time.sleep(0.2)  # the small calls under way (a measurement: no test waits like this)
        start, end, code = _timed(big)
        stop.set()
    overlapped = [e - s for s, e, c in small if s < end and e > start]
    assert all(c == "OK" for _, _, c in small), {c for _, _, c in small}
    return end - start, code, overlapped


async def run(root: Path, repeats: int) -> str:
    load_before = os.getloadavg()[0]
    argv = service_argv()
    cwd = Path.cwd()
    os.chdir(root)  # `python -m service` imports the checkout's code, serves its model
    try:
        async with serving_process(argv) as (target, _):
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.TranslatorStub(channel)
                idle = [
                    await asyncio.to_thread(_timed, lambda: stub.Translate(SMALL, timeout=60))
                    for _ in range(50)
                ]
                rows = [("small call alone (50 in a row)", "", "", _ms(e - s for s, e, _ in idle))]
                for name, case in CASES.items():
                    for _ in range(repeats):
                        seconds, code, overlapped = await asyncio.to_thread(
                            measure, stub, partial(case, stub)
                        )
                        rows.append((name, code, f"{seconds * 1000:,.0f}", _ms(overlapped)))
    finally:
        os.chdir(cwd)
    table = [
        "| call | status | its time (ms) | small calls meanwhile: n, median, max (ms) |",
        "|---|---|---:|---|",
    ]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    machine = machine_table(describe_machine(), load_before, [("server", f"`python -m service` from {root}")])
    return "\n".join(table) + "\n\n" + machine


def _ms(seconds: Iterable[float]) -> str:
    values = [1000 * s for s in seconds]
    if not values:
        return "none"
    return f"{len(values)}, {statistics.median(values):,.0f}, {max(values):,.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.request_stall", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout whose server to run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each large call")
    args = parser.parse_args(argv)
    print(asyncio.run(run(args.root.resolve(), args.repeats)))


if __name__ == "__main__":
    main()
