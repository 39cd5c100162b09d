"""Training: the learning-rate schedule, a loss that falls, and bit-for-bit reproducibility."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from export.data import encode_pairs
from export.model import Transformer
from export.training.tokenizer import train_tokenizer
from export.training.train import DEFAULT_MODEL, TrainConfig, learning_rate, train_model
from service.modeldir.tokenizer import Tokenizer

NOUNS = [("cat", "chat"), ("dog", "chien"), ("car", "voiture"), ("book", "livre"), ("tree", "arbre")]
ADJECTIVES = [("red", "rouge"), ("black", "noir"), ("small", "petit")]


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        (en_n, fr_n), (en_a, fr_a) = rng.choice(NOUNS), rng.choice(ADJECTIVES)
        pairs.append((f"The {en_a} {en_n}.", f"Le {fr_n} {fr_a}."))
    return pairs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = Path(tmp_path_factory.mktemp("tok")) / "tokenizer.json"
    train_tokenizer(toy_pairs(500), vocab_size=300).save(str(path))
    return Tokenizer.from_file(path)


def tiny_run(tokenizer: Tokenizer, steps: int) -> tuple[Transformer, list[dict[str, float]]]:
    torch.manual_seed(7)
    cfg = replace(DEFAULT_MODEL, vocab_size=tokenizer.vocab_size, d_model=32, d_ff=64, n_heads=2)
    cfg = replace(cfg, n_encoder_layers=1, n_decoder_layers=1)
    model = Transformer(cfg)
    pairs = toy_pairs(400)
    train_cfg = TrainConfig(steps=steps, max_tokens=600, warmup_steps=10, eval_every=steps, eval_sentences=20)
    log = train_model(
        model,
        tokenizer,
        encode_pairs(tokenizer, pairs, cfg.max_positions),
        pairs[:20],
        train_cfg,
        progress=False,
    )
    return model, log


def test_schedule_warms_up_linearly_then_decays_as_inverse_sqrt() -> None:
    cfg = TrainConfig(peak_lr=1e-3, warmup_steps=100)
    assert learning_rate(50, cfg) == pytest.approx(0.5e-3)
    assert learning_rate(100, cfg) == pytest.approx(1e-3)
    assert learning_rate(400, cfg) == pytest.approx(0.5e-3)  # √(100/400) = 1/2
    assert max(learning_rate(s, cfg) for s in range(1, 1000)) == pytest.approx(1e-3)


def test_training_is_reproducible_and_learns(tokenizer: Tokenizer) -> None:
    first, log = tiny_run(tokenizer, steps=60)
    second, _ = tiny_run(tokenizer, steps=60)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs between two seeded runs"
    untrained, _ = tiny_run(tokenizer, steps=1)
    assert log[-1]["valid_loss"] < 0.5 * _valid_loss(untrained, tokenizer)


def _valid_loss(model: Transformer, tokenizer: Tokenizer) -> float:
    from export.training.train import batch_loss

    pairs = toy_pairs(400)[:20]
    loss, _ = batch_loss(model, encode_pairs(tokenizer, pairs, model.cfg.max_positions), 0.0)
    return loss.item()
