"""Shared factories for the tests: tiny Transformer configs and models, padded id batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from export.model import Transformer, TransformerConfig

# Deliberately tiny: every test of the export package must run in seconds on 2 CPU cores.
TINY: dict[str, Any] = {
    "vocab_size": 24,
    "d_model": 16,
    "n_heads": 2,
    "n_encoder_layers": 2,
    "n_decoder_layers": 2,
    "d_ff": 32,
    "max_positions": 32,
    "dropout": 0.0,
}


def _config(**overrides: Any) -> TransformerConfig:
    return TransformerConfig(**{**TINY, **overrides})


def _model(seed: int = 0, **overrides: Any) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_config(**overrides)).eval()


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., TransformerConfig]:
    """`tiny_config(**overrides)` → a small TransformerConfig."""
    return _config


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Transformer]:
    """`tiny_model(seed=0, **config_overrides)` → a seeded, randomly initialised model in eval mode."""
    return _model


def _padded(sequences: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences], dtype=torch.long)


@pytest.fixture(scope="session")
def padded() -> Callable[..., torch.Tensor]:
    """`padded(sequences, pad_id=0)` → a (B, T) long tensor, right-padded (independent of export.data)."""
    return _padded


@pytest.fixture(scope="session")
def corpus_splits() -> dict[str, list[tuple[str, str]]]:
    """The default corpus, generated exactly as `make train` / `make eval` generate it (≈15 s)."""
    from export.corpus import CorpusConfig, generate_corpus

    splits = generate_corpus(CorpusConfig())
    return {name: [(p.en, p.fr) for p in pairs] for name, pairs in splits.items()}
