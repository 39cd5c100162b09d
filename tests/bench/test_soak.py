"""bench.soak, short: a real `python -m service` (one process, and --workers 2) under the soak's mixed
load; what it must hold, never how fast."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.soak import soak

ROOT = Path(__file__).resolve().parents[2]
# RSS may grow this much from the end of a short warm-up (one burst) to the end of a short run: the
# allocator's arenas still reach their high-water mark after the first burst (the standard 30-minute
# run, warm-up 6 minutes, is held to 5 %: docs/reliability.md, Soak).
# The two-worker run (60 s, warm-up 20 s) is too short for any bound: two processes' arenas were
# still growing there (+18 % in one clean-clone CI run), so it checks everything but memory.
SHORT_RUN_RSS_GROWTH = 0.15


@pytest.mark.full  # ≈2 min per server: make test-full and CI
@pytest.mark.parametrize(
    ("workers", "duration_s", "rss_bound"), [(1, 120.0, SHORT_RUN_RSS_GROWTH), (2, 60.0, None)]
)
def test_a_short_soak_loses_no_call_and_reconciles_with_the_server(
    workers: int,
    duration_s: float,
    rss_bound: float | None,
    corpus_splits: dict[str, list[tuple[str, str]]],
) -> None:
    texts = [en for en, _ in corpus_splits["test"]]
    result = asyncio.run(
        soak(
            ROOT / "models" / "en-fr-small",
            texts,
            workers=workers,
            duration_s=duration_s,
            warm_up_s=duration_s / 3,
            clients=12,
            burst_every_s=duration_s / 4,
            burst_calls=200,
            rss_every_s=2.0,
        )
    )
    load = result.load
    assert load.lost == 0 and load.sent == sum(load.counts.values())
    assert result.counted == load.counts  # exactly, by (rpc, code)
    kinds = {code for _, code in load.counts}
    assert kinds <= {
        "OK",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
    }
    # every kind of outcome the load is built to bring about happened (bursts beyond capacity: refusals)
    assert kinds >= {
        "OK",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
    }
    assert result.gauges and not any(result.gauges.values()), result.gauges
    assert result.error_lines == []
    assert result.exit_code == 0
    if rss_bound is not None:
        assert result.rss_growth < rss_bound, result.rss
