"""bench.call_cost runs end to end: a bare grpc.aio server and the real service in subprocesses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.call_cost import main


@pytest.mark.full  # ≈12 s: make test-full and CI
def test_the_call_cost_benchmark_writes_its_page(tmp_path: Path) -> None:
    out, corpus = tmp_path / "call-cost.md", tmp_path / "test.tsv"
    # a few sentences for the encoder rows (a clean clone has no data/corpus: generating it is slow)
    corpus.write_text("I love cats.\tJ'aime les chats.\nWe see a small dog.\tNous voyons un petit chien.\n")
    assert main(["--clients", "4", "--duration", "0.5", "--corpus", str(corpus), "--out", str(out)]) == 0
    page = out.read_text()
    rows = dict(re.findall(r"^\| (.+?) \| [\d,]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|$", page, re.MULTILINE))
    assert set(rows) == {
        "grpc.aio alone (echo, no model)",
        "`python -m service`, max_output_tokens 1",
        "`python -m service`, decoded to the end",
    }
    # a call through the model costs more than grpc.aio's own work, a longer one more again
    echo, one, whole = (float(rows[k]) for k in rows)
    assert 0 < echo < one < whole
    assert "| 1 |" in page and "| 32 |" in page  # the encoder's batch sizes
