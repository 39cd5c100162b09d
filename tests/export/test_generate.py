"""export.generate: greedy and beam search against each other and against teacher forcing.

Two models: a randomly initialised one (outputs rarely end) and one trained for a couple of
seconds to reverse its input, so that hypotheses are non-trivial and end with the end token.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from export.generate import Hypothesis, beam_search, greedy_decode
from export.model import Transformer, TransformerConfig

BOS, EOS, PAD = 1, 2, 0
VOCAB = 20
FIRST_WORD = 4  # ids 0..3 are the special tokens
MAX_OUT = 10


def reverse_task_batch(generator: torch.Generator, size: int, max_len: int) -> tuple[torch.Tensor, ...]:
    """Random words → the same words reversed: (src, tgt_in, tgt_out), right-padded."""
    width = max_len + 1
    src = torch.full((size, width), PAD)
    tgt_in = torch.full((size, width), PAD)
    tgt_out = torch.full((size, width), PAD)
    lengths = torch.randint(2, max_len + 1, (size,), generator=generator).tolist()
    for row, length in enumerate(lengths):
        words = torch.randint(FIRST_WORD, VOCAB, (length,), generator=generator)
        src[row, :length], src[row, length] = words, EOS
        tgt_in[row, 0], tgt_in[row, 1 : length + 1] = BOS, words.flip(0)
        tgt_out[row, :length], tgt_out[row, length] = words.flip(0), EOS
    return src, tgt_in, tgt_out


@pytest.fixture(scope="module")
def random_model(tiny_model) -> Transformer:
    return tiny_model(seed=11, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def trained_model(tiny_model) -> Transformer:
    """A 1+1-layer model trained for ~150 Adam steps on reversal (a couple of seconds)."""
    model = tiny_model(seed=0, vocab_size=VOCAB, d_model=32, d_ff=64, n_encoder_layers=1, n_decoder_layers=1)
    model.train()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        src, tgt_in, tgt_out = reverse_task_batch(generator, 64, 6)
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt_out.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


RANDOM_SOURCES = [[5, 9, 11, 2], [7, 8, 12, 13, 14, 15, 4, 2], [19, 2], [6, 6, 17, 10, 2]]
REVERSE_SOURCES = [[5, 9, 11, 2], [7, 8, 12, 13, 14, 15, 2], [19, 4, 2], [6, 6, 17, 10, 18, 2], [16, 10, 2]]


@pytest.fixture(params=["random", "trained"])
def model_and_sources(request) -> tuple[Transformer, list[list[int]]]:
    if request.param == "random":
        return request.getfixturevalue("random_model"), RANDOM_SOURCES
    return request.getfixturevalue("trained_model"), REVERSE_SOURCES


def teacher_forced_score(model: Transformer, source: list[int], hyp: Hypothesis) -> float:
    """Sum of the model's log-probabilities of the hypothesis tokens (+ the end token when finished)."""
    produced = hyp.tokens + ([EOS] if hyp.finished else [])
    tgt_in = torch.tensor([[BOS, *produced[:-1]]])
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([source]), tgt_in), dim=-1)[0]
    return float(log_probs[torch.arange(len(produced)), torch.tensor(produced)].sum())


def assert_same_hypothesis(a: Hypothesis, b: Hypothesis, abs_tol: float = 1e-5) -> None:
    assert a.tokens == b.tokens
    assert a.finished == b.finished
    assert a.score == pytest.approx(b.score, abs=abs_tol)


def test_trained_model_learned_to_reverse(trained_model, padded) -> None:
    hyps = greedy_decode(trained_model, padded(REVERSE_SOURCES), MAX_OUT)
    assert all(h.finished for h in hyps)
    correct = sum(h.tokens == src[:-1][::-1] for h, src in zip(hyps, REVERSE_SOURCES, strict=True))
    assert correct >= 3


def test_beam_size_one_is_greedy(model_and_sources, padded) -> None:
    model, sources = model_and_sources
    src = padded(sources)
    greedy = greedy_decode(model, src, MAX_OUT)
    beam = beam_search(model, src, MAX_OUT, beam_size=1, length_penalty=1.0)
    for g, b in zip(greedy, beam, strict=True):
        assert len(b) == 1
        assert_same_hypothesis(g, b[0], abs_tol=1e-6)


def test_greedy_in_a_batch_equals_greedy_alone(model_and_sources, padded) -> None:
    model, sources = model_and_sources
    batch = greedy_decode(model, padded(sources), MAX_OUT)
    for source, hyp in zip(sources, batch, strict=True):
        (alone,) = greedy_decode(model, torch.tensor([source]), MAX_OUT)
        assert_same_hypothesis(hyp, alone)


def test_beam_search_in_a_batch_equals_beam_search_alone(model_and_sources, padded) -> None:
    model, sources = model_and_sources
    batch = beam_search(model, padded(sources), MAX_OUT, beam_size=3, n_best=3)
    for source, hyps in zip(sources, batch, strict=True):
        (alone,) = beam_search(model, torch.tensor([source]), MAX_OUT, beam_size=3, n_best=3)
        assert len(hyps) == len(alone) == 3
        for a, b in zip(hyps, alone, strict=True):
            assert_same_hypothesis(a, b)


def test_beam_search_scores_at_least_greedy_without_length_penalty(random_model, padded) -> None:
    # Beam search prunes, so beating greedy is not a theorem; on this model it must hold, and the
    # exact stopping rule is pinned down by the hand-computed TableModel test below.
    model = random_model
    src = padded(RANDOM_SOURCES)
    greedy = greedy_decode(model, src, MAX_OUT)
    for beam_size in (2, 3, 4):
        beam = beam_search(model, src, MAX_OUT, beam_size=beam_size, length_penalty=0.0)
        for g, (best,) in zip(greedy, beam, strict=True):
            assert best.score >= g.score - 1e-5, (beam_size, g, best)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_n_best_lists_are_ranked(model_and_sources, padded, length_penalty: float) -> None:
    model, sources = model_and_sources
    src = padded(sources)
    ranked = beam_search(model, src, MAX_OUT, beam_size=4, n_best=4, length_penalty=length_penalty)
    best = beam_search(model, src, MAX_OUT, beam_size=4, n_best=1, length_penalty=length_penalty)
    for hyps, (top,) in zip(ranked, best, strict=True):
        assert len(hyps) == 4
        assert len({tuple(h.tokens) for h in hyps}) == 4  # four different hypotheses
        lengths = [len(h.tokens) + h.finished for h in hyps]  # the end token counts
        normalized = [h.score / max(n, 1) ** length_penalty for h, n in zip(hyps, lengths, strict=True)]
        assert normalized == sorted(normalized, reverse=True)
        assert_same_hypothesis(hyps[0], top, abs_tol=0.0)


@pytest.mark.parametrize("n_best", [0, 3])
def test_n_best_must_fit_the_beam(random_model, n_best: int) -> None:
    with pytest.raises(ValueError, match="n_best"):
        beam_search(random_model, torch.tensor([[5, 2]]), 4, beam_size=2, n_best=n_best)


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_max_output_tokens_is_respected(model_and_sources, padded, limit: int) -> None:
    model, sources = model_and_sources
    src = padded(sources)
    greedy = greedy_decode(model, src, limit)
    beams = [h for hyps in beam_search(model, src, limit, beam_size=3, n_best=3) for h in hyps]
    for hyp in greedy + beams:
        if hyp.finished:
            assert len(hyp.tokens) < limit  # the end token was the last of at most `limit`
        else:
            assert len(hyp.tokens) == limit
    if limit == 0:
        assert all(h == Hypothesis([], 0.0, False) for h in greedy + beams)


def test_limit_hit_by_the_trained_model_is_unfinished(trained_model, padded) -> None:
    long_source = [7, 8, 12, 13, 14, 15, 2]
    (hyp,) = greedy_decode(trained_model, torch.tensor([long_source]), 4)
    assert not hyp.finished and len(hyp.tokens) == 4
    (full,) = greedy_decode(trained_model, torch.tensor([long_source]), MAX_OUT)
    assert full.finished and full.tokens[:4] == hyp.tokens
    # Every reversal needs at least 2 words + the end token: none can finish within 2 tokens.
    assert not any(h.finished for h in greedy_decode(trained_model, padded(REVERSE_SOURCES), 2))


def test_scores_equal_teacher_forced_log_probabilities(model_and_sources, padded) -> None:
    model, sources = model_and_sources
    src = padded(sources)
    greedy = greedy_decode(model, src, MAX_OUT)
    beams = beam_search(model, src, MAX_OUT, beam_size=3, n_best=3, length_penalty=1.0)
    for source, g, hyps in zip(sources, greedy, beams, strict=True):
        for hyp in [g, *hyps]:
            assert EOS not in hyp.tokens
            assert hyp.score == pytest.approx(teacher_forced_score(model, source, hyp), abs=1e-4)


# --- a model with hand-written next-token probabilities -----------------------------------------

A, B, C = 4, 5, 6


class TableModel(Transformer):
    """Next-token probabilities looked up by prefix (without the start token) in a table; the
    probability mass a table entry leaves over is spread evenly over the other tokens."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]]) -> None:
        super().__init__(
            TransformerConfig(vocab_size=8, d_model=2, n_heads=1, n_encoder_layers=0, n_decoder_layers=0)
        )
        self.table = table

    def decode(self, memory, src_mask, tgt, tgt_mask, attentions=None):  # type: ignore[override]
        # "Hidden state" at every position: the whole prefix, so that logits() can read it.
        return tgt.float()[:, None, :].expand(tgt.size(0), tgt.size(1), tgt.size(1))

    def logits(self, hidden):  # type: ignore[override]
        rows = []
        for prefix in hidden.long().tolist():
            given = self.table.get(tuple(prefix[1:]), {EOS: 0.99})
            rest = (1.0 - sum(given.values())) / (8 - len(given))
            rows.append([math.log(given.get(token, rest)) for token in range(8)])
        return torch.tensor(rows)


TABLE = {
    (): {A: 0.6, EOS: 0.3, B: 0.08},
    (A,): {C: 0.9, EOS: 0.06},
    (B,): {EOS: 0.9},
    (A, C): {EOS: 0.99},
}


def test_greedy_and_beam_one_on_hand_written_probabilities() -> None:
    model = TableModel(TABLE)
    src = torch.tensor([[A, EOS], [B, EOS]])
    want = Hypothesis([A, C], math.log(0.6) + math.log(0.9) + math.log(0.99), True)
    for hyp in greedy_decode(model, src, 5):
        assert_same_hypothesis(hyp, want)
    for (hyp,) in beam_search(model, src, 5, beam_size=1):
        assert_same_hypothesis(hyp, want)
    (cut,) = greedy_decode(model, src[:1], 2)
    assert_same_hypothesis(cut, Hypothesis([A, C], math.log(0.6 * 0.9), False))


def test_beam_search_keeps_going_while_a_live_beam_can_still_win() -> None:
    # Beam 2: step 1 finishes [] (p 0.3) and keeps [A], [B]; step 2 finishes [B] (p 0.072) and
    # keeps [A C] (p 0.54). Two hypotheses have finished, but the live [A C] already beats both
    # (and ends with p 0.54 × 0.99 at the next step): the search must not stop there.
    model = TableModel(TABLE)
    ((best,),) = beam_search(model, torch.tensor([[A, EOS]]), 5, beam_size=2, length_penalty=0.0)
    assert_same_hypothesis(best, Hypothesis([A, C], math.log(0.6 * 0.9 * 0.99), True))
