"""Fixtures of the importer's tests: tiny Marian, NLLB and M2M100 checkpoints and their imports (built
once a session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from export.import_hf.importer import import_checkpoint
from tests.export.import_hf import tiny_checkpoints

# The checkpoints the library-level equality test runs on: tiny_checkpoints.build_marian's options.
KINDS: dict[str, dict[str, Any]] = {
    "shared": {},  # one vocabulary, one table, swish: OPUS-MT's usual layout
    "separate-vocabs": {"separate_vocabs": True},
    "relu": {"activation_function": "relu"},
    "gelu": {"activation_function": "gelu"},
    "untied-output": {"tie_word_embeddings": False},  # lm_head stored apart from the embeddings
}


@pytest.fixture(scope="session")
def tiny_corpus() -> dict[str, list[tuple[str, str]]]:
    return tiny_checkpoints.corpus()


@pytest.fixture(scope="session")
def imported(
    tmp_path_factory: pytest.TempPathFactory, tiny_corpus: dict[str, list[tuple[str, str]]]
) -> Callable[[str], tuple[Path, Path]]:
    """kind → (its checkpoint, its import); each built on first use. The import's directory, and so
    the served model's name, is `tiny-marian` for "shared" and `tiny-marian-<kind>` otherwise."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in built:
            name = "tiny-marian" if kind == "shared" else f"tiny-marian-{kind}"
            checkpoint = tiny_checkpoints.build_marian(
                tmp_path_factory.mktemp("hf") / name, tiny_corpus["train"], **KINDS[kind]
            )
            out = tmp_path_factory.mktemp("imported") / name
            import_checkpoint(checkpoint, out)
            built[kind] = checkpoint, out
        return built[kind]

    return get


@pytest.fixture(scope="session")
def marian_checkpoint(imported: Callable[[str], tuple[Path, Path]]) -> Path:
    return imported("shared")[0]


@pytest.fixture(scope="session")
def marian_model_dir(imported: Callable[[str], tuple[Path, Path]]) -> Path:
    return imported("shared")[1]


@pytest.fixture(scope="session")
def separate_checkpoint(imported: Callable[[str], tuple[Path, Path]]) -> Path:
    return imported("separate-vocabs")[0]


@pytest.fixture(scope="session")
def separate_model_dir(imported: Callable[[str], tuple[Path, Path]]) -> Path:
    return imported("separate-vocabs")[1]


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
