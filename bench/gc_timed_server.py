"""`python -m service` with every garbage collection timed: `bench.gc_pauses`'s server process.

    python -m bench.gc_timed_server OUT.json [--no-freeze] -- <python -m service flags>

Imports nothing but the service, so that the process holds what a real server holds (the rest of
bench/ pulls in torch). When the server stops, OUT.json gets each collection's generation, the
wall-clock time it ended and its length, and the objects the collector tracks and has frozen.
`--no-freeze` disables the server's freeze of its startup objects: the comparison.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import service.server
from service.__main__ import main as serve


def main(argv: Sequence[str]) -> int:
    out, rest = Path(argv[0]), list(argv[1:])
    split = rest.index("--") if "--" in rest else len(rest)
    freeze, service_argv = "--no-freeze" not in rest[:split], rest[split + 1 :]
    pauses: list[tuple[int, float, float]] = []  # generation, wall-clock end, seconds
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.time(), time.perf_counter() - started[0]))

    gc.callbacks.append(timed)
    if not freeze:
        service.server.freeze_startup_objects = lambda: None
    try:
        return serve(service_argv)
    finally:
        gc.callbacks.remove(timed)
        record = {"pauses": pauses, "tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count()}
        out.write_text(json.dumps(record))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
