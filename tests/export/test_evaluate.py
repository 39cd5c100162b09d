"""Evaluation figures and the model card."""

from __future__ import annotations

import pytest

from export.training.evaluate import quality_bar, render_markdown, score


def test_identical_outputs_score_perfectly() -> None:
    refs = ["Le chat est noir.", "J'aime les chats."]
    s = score(refs, refs)
    assert (s.bleu, s.chrf, s.exact_match, s.sentences) == (
        pytest.approx(100.0),
        pytest.approx(100.0),
        100.0,
        2,
    )


def test_exact_match_counts_whole_sentences() -> None:
    s = score(["Le chat est noir.", "J'aime le chat."], ["Le chat est noir.", "J'aime les chats."])
    assert s.exact_match == 50.0
    assert 0.0 < s.bleu < 100.0


def test_quality_bar_and_card() -> None:
    figures = {"bleu": 98.0, "chrf": 99.0, "exact_match": 92.0, "sentences": 10, "seconds": 1.0}
    results = {
        d: {"valid": figures, "test": figures, "heldout": {**figures, "bleu": 85.0}}
        for d in ("greedy", "beam4")
    }
    bars = quality_bar(results)
    assert [b["met"] for b in bars] == [True, True, False]
    card = {
        "name": "m",
        "architecture": {
            "d_model": 8,
            "n_heads": 2,
            "n_encoder_layers": 1,
            "n_decoder_layers": 1,
            "d_ff": 16,
            "activation": "relu",
            "norm_placement": "post",
            "vocab_size": 10,
            "max_positions": 32,
        },
        "parameters": 1234,
        "weights_bytes": 5000,
        "machine": "x",
        "results": results,
        "quality_bar": bars,
    }
    md = render_markdown(card)
    assert "| held-out combinations | beam4 | 85.00 |" in md
    assert "heldout bleu ≥ 90.0: 85.0 (NOT met)" in md
