"""bench.import_hf runs end to end at a tiny size: checkpoint built, imported, served, measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.import_hf import MODEL_NAME, Size, main, marian_config

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--vocab", "1000"]


@pytest.mark.full
def test_the_import_benchmark_writes_its_page(tmp_path: Path) -> None:
    out, work = tmp_path / "import-benchmark.md", tmp_path / "work"
    argv = [*TINY, "--corpus-pairs", "2000", "--calls", "2", "--texts", "2", "--int8-sentences", "5"]
    assert main([*argv, "--work-dir", str(work), "--out", str(out)]) == 0
    page = out.read_text()
    assert "python -m bench.import_hf --d-model 32 --layers 1" in page
    figures = dict(re.findall(r"^\| (.+?) \| ([\d,.]+ (?:MB|s)) \|$", page, re.MULTILINE))
    assert len(figures) == 5  # checkpoint, import time, fp32 directory, int8 time, int8 directory
    assert (work / MODEL_NAME / "int8" / "manifest.json").is_file()  # kept under --work-dir
    servers = re.findall(
        r"^\| (fp32|int8) \| (the default model.*?) \| ([\d,]+) \| ([\d,]+) \|", page, re.MULTILINE
    )
    assert len(servers) == 4 and all(int(rss.replace(",", "")) > 50 for *_, rss, _ in servers)
    shares = re.findall(
        r"^\| (fp32|int8) \| \*\*the imported model's share\*\* \| \*\*([+-][\d,]+)\*\*", page, re.MULTILINE
    )
    assert [variant for variant, _ in shares] == ["fp32", "int8"]
    assert re.search(r"2 × 2 texts, [1-9][\d,]* output tokens", page)
    sessions = re.findall(r"^\| (fp32|int8)((?: \| [\d,]+){4}) \|$", page, re.MULTILINE)
    assert [variant for variant, _ in sessions] == ["fp32", "int8"]  # encoder, decoder_step, attention, all


def test_the_parameter_count_is_the_checkpoints() -> None:
    from transformers import MarianMTModel

    size = Size(d_model=32, layers=2, heads=2, ffn=64, vocab=500)
    config = marian_config(size, pad_id=499)
    model = MarianMTModel(config)
    # the sinusoids are computed, never stored; the final logits bias is a buffer
    learned = sum(p.numel() for n, p in model.named_parameters() if "embed_positions" not in n)
    assert size.parameters == learned + model.final_logits_bias.numel()
