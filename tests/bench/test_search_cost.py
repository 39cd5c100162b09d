"""bench.search_cost smoke test: it records real decoder steps, replays them through this checkout's
search and a git revision's, and finds them identical. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.search_cost import load_revision, main

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_against_head_finds_identical_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model-dir", str(ROOT / "models" / "en-fr-small"), "--variant", ""]
    assert (
        main([*args, "--sentences", "3", "--batches", "1", "2", "--rounds", "1", "--baseline", "HEAD"]) == 0
    )
    out = capsys.readouterr().out
    assert "| greedy | 2 |" in out and "| beam 4 | 1 |" in out and "OUTPUTS DIFFER" not in out


def test_a_revision_is_loaded_as_a_module_of_its_own() -> None:
    module = load_revision("HEAD")
    assert module.__name__ != "service.decoding" and callable(module.advance_rows)
