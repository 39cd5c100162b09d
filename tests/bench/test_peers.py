"""bench.peers: every system decodes the same weights to the same tokens, and the run writes its records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.peers import main

SETTINGS = "engine-fp32:1x1,engine-int8:1x2,ct2-float32:1x1,ct2-int8:1x2"


def _run(tmp_path: Path, *argv: str) -> dict:
    out, results = tmp_path / "peers.md", tmp_path / "peers.json"
    common = [
        "--work-dir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--json",
        str(results),
        "--rounds",
        "1",
    ]
    assert main([*argv, *common]) == 0
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    return json.loads(results.read_text())


def test_ctranslate2_decodes_the_default_model_as_this_engine_does(tmp_path: Path) -> None:
    """The default model written out as a Marian checkpoint and loaded by FaithfulMarianLoader:
    CTranslate2 float32 gives this engine's fp32 tokens on every sentence, greedy (the stock
    loader would drop the last vocabulary entry and start from a zero vector)."""
    run = _run(
        tmp_path,
        *("--models", "default", "--sentences", "16", "--batches", "1,8", "--beams", "1"),
        *("--settings", SETTINGS, "--no-memory", "--no-service"),
    )
    cells = {(c["setting"], c["batch"]): c for c in run["cells"]}
    assert len(cells) == 8
    for batch in (1, 8):
        assert cells[("ct2-float32 1t×1", batch)]["agreement"] == 1.0
        assert cells[("engine-int8 1t×2", batch)]["agreement"] == 1.0


@pytest.mark.full
def test_a_small_run_of_both_models_with_memory_and_the_service(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        *("--models", "default,base", "--base-size", "64,2,4,128,2000", "--sentences", "8"),
        *("--base-sentences", "8", "--batches", "1,8", "--beams", "1,4", "--service-seconds", "2"),
        *("--settings", "engine-int8:1x1,ct2-int8:1x1,transformers:1x1"),
    )
    assert {c["model"] for c in run["cells"]} == {"default", "base"}
    # models × beams × (two systems at batch 1, three at 8: Transformers only from batch 8)
    assert len(run["cells"]) == 2 * 2 * (2 + 3)
    assert {c["batch"] for c in run["cells"] if c["system"] == "transformers"} == {8}
    assert len(run["memory"]) == 2 * 3 and all(m["peak_mb"] > m["baseline_mb"] > 0 for m in run["memory"])
    assert [s["model"] for s in run["service"]] == ["default", "base"]
    assert all(s["errors"] == 0 and s["output_tokens_per_s"] > 0 for s in run["service"])
