"""The committed default model: loads without training, translates the test set, survives bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.checkpoint import TOKENIZER_FILE, load_model
from export.model import Transformer
from export.training.evaluate import score
from export.translate import DEFAULT_MODEL_DIR, translate_texts
from export.variants import VARIANTS
from service.modeldir.tokenizer import InputTooLongError, Tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODELS_BUDGET_BYTES = 24 * 1000 * 1000  # the budget for everything under models/

KNOWN_PAIRS = [
    ("I love cats.", "J'aime les chats."),
    ("I see cats.", "Je vois des chats."),
    ("I drink water.", "Je bois de l'eau."),
    ("Do you see the cat?", "Est-ce que vous voyez le chat ?"),
    ("I speak to the teacher.", "Je parle au professeur."),
    ("I look at the bird.", "Je regarde l'oiseau."),
]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.set_num_threads(2)
    return load_model(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_MODEL_DIR / TOKENIZER_FILE)


def test_committed_model_fits_the_size_budget() -> None:
    # What is committed: everything under models/ but the variants `make setup` derives.
    files = [p for p in (ROOT / "models").rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files if p.relative_to(ROOT / "models").parts[1] not in VARIANTS)
    assert total <= MODELS_BUDGET_BYTES, f"models/ holds {total} bytes, budget {MODELS_BUDGET_BYTES}"


@pytest.mark.parametrize("beam_size", [1, 4])
def test_known_pairs(model: Transformer, tokenizer: Tokenizer, beam_size: int) -> None:
    sources = [en for en, _ in KNOWN_PAIRS]
    assert translate_texts(model, tokenizer, sources, beam_size=beam_size) == [fr for _, fr in KNOWN_PAIRS]


def test_translates_a_sample_of_the_test_set(
    model: Transformer, tokenizer: Tokenizer, corpus_splits: dict[str, list[tuple[str, str]]]
) -> None:
    sample = corpus_splits["test"][:200]
    hyps = translate_texts(model, tokenizer, [en for en, _ in sample], beam_size=4)
    scores = score(hyps, [fr for _, fr in sample])
    wrong = [(en, h, fr) for h, (en, fr) in zip(hyps, sample, strict=True) if h != fr]
    assert scores.exact_match >= 90.0, (
        f"exact match {scores.exact_match:.1f}% < 90%; first misses: {wrong[:5]}"
    )
    assert scores.bleu >= 97.0


def test_empty_input_gives_empty_output(model: Transformer, tokenizer: Tokenizer) -> None:
    assert translate_texts(model, tokenizer, ["", "   ", "I love cats."]) == ["", "", "J'aime les chats."]


def test_unknown_characters_and_emoji_do_not_crash(model: Transformer, tokenizer: Tokenizer) -> None:
    texts = ["I love 🐱 cats.", "Ωmega ∑ 漢字 sees the dog.", "\u0000\u200b"]
    out = translate_texts(model, tokenizer, texts, beam_size=2)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)


def test_too_long_input_names_the_limit(model: Transformer, tokenizer: Tokenizer) -> None:
    limit = model.cfg.max_positions
    with pytest.raises(InputTooLongError, match=f"limit of {limit}"):
        translate_texts(model, tokenizer, ["the cat " * limit])


def test_cli_translates_stdin_and_reports_long_lines() -> None:
    long_line = "the cat " * 200
    proc = subprocess.run(
        [sys.executable, "-m", "export.translate", "--beam-size", "2"],
        input=f"I love cats.\n\n{long_line}\nI see cats.\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.stdout.splitlines() == ["J'aime les chats.", "", "", "Je vois des chats."]
    assert proc.returncode == 1
    assert "line 3" in proc.stderr and "limit of 128" in proc.stderr
