"""Fixtures of the importer's tests: a tiny Marian checkpoint and its import (built once a session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.import_hf.importer import import_checkpoint
from tests.export.import_hf import tiny_checkpoints


@pytest.fixture(scope="session")
def tiny_corpus() -> dict[str, list[tuple[str, str]]]:
    return tiny_checkpoints.corpus()


@pytest.fixture(scope="session")
def marian_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_corpus) -> Path:
    return tiny_checkpoints.build_marian(tmp_path_factory.mktemp("hf") / "tiny-marian", tiny_corpus["train"])


@pytest.fixture(scope="session")
def marian_model_dir(tmp_path_factory: pytest.TempPathFactory, marian_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tiny-marian"
    import_checkpoint(marian_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def nllb_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_corpus) -> Path:
    return tiny_checkpoints.build_nllb(tmp_path_factory.mktemp("hf") / "tiny-nllb", tiny_corpus["train"])


@pytest.fixture(scope="session")
def nllb_model_dir(tmp_path_factory: pytest.TempPathFactory, nllb_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tiny-nllb"
    import_checkpoint(nllb_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def m2m100_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_corpus) -> Path:
    return tiny_checkpoints.build_m2m100(tmp_path_factory.mktemp("hf") / "tiny-m2m100", tiny_corpus["train"])


@pytest.fixture(scope="session")
def m2m100_model_dir(tmp_path_factory: pytest.TempPathFactory, m2m100_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tiny-m2m100"
    import_checkpoint(m2m100_checkpoint, out)
    return out
