"""bench.gc_pauses runs end to end: the real service in subprocesses, its collections timed."""

from __future__ import annotations

import re
from pathlib import Path

from bench.gc_pauses import main


def test_the_gc_pause_benchmark_writes_its_page(tmp_path: Path) -> None:
    out = tmp_path / "gc-pauses.md"
    assert main(["--clients", "4", "--duration", "1", "--out", str(out)]) == 0
    page = out.read_text()
    pauses = re.findall(r"^\| (.+?) \| ([012]) \| [\d,]+ \| [\d.]+ \| [\d.]+ \|$", page, re.MULTILINE)
    assert len(pauses) == 6 and {g for _, g in pauses} == {"0", "1", "2"}
    objects = {
        server: (int(tracked.replace(",", "")), int(frozen.replace(",", "")))
        for server, tracked, frozen in re.findall(
            r"^\| (.+?) \| [\d,]+ \| ([\d,]+) \| ([\d,]+) \|$", page, re.MULTILINE
        )
    }
    shipped, disabled = objects["as shipped (startup objects frozen)"], objects["freeze disabled"]
    # frozen, the startup objects (tens of thousands) leave the collector's reach; not frozen, they stay
    assert shipped[1] > 10_000 and shipped[0] < shipped[1] / 10
    assert disabled[1] == 0 and disabled[0] > shipped[1] / 2
