"""make verify's checks on the committed default model (a sample of the test set; make verify
decodes all of it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.translate import DEFAULT_MODEL_DIR
from export.verify import Check, run_checks


@pytest.fixture(scope="module")
def checks(
    corpus_splits: dict[str, list[tuple[str, str]]], tmp_path_factory: pytest.TempPathFactory
) -> list[Check]:
    # The corpus fixture's test split, written where run_checks reads it.
    corpus_dir = Path(tmp_path_factory.mktemp("corpus"))
    lines = "".join(f"{en}\t{fr}\n" for en, fr in corpus_splits["test"])
    (corpus_dir / "test.tsv").write_text(lines, encoding="utf-8")
    torch.set_num_threads(2)
    return run_checks(DEFAULT_MODEL_DIR, corpus_dir, sentences=120)


@pytest.mark.parametrize(
    "name", ["manifest", "parity", "cache", "greedy", "beam4", "staggered1", "staggered4", "fresh"]
)
def test_check_passes(checks: list[Check], name: str) -> None:
    (check,) = [c for c in checks if c.name == name]
    assert check.passed, check.detail
