"""service.decoding: hand-made log-probability tables, then the PyTorch reference as the oracle."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.generate import beam_search, greedy_decode
from export.model import Transformer
from service.decoding import (
    Advance,
    Hypothesis,
    Sampling,
    SearchOptions,
    SearchState,
    advance,
    advance_rows,
    greedy_select,
    normalized_score,
    sample_select,
    start_search,
    top_candidates,
)

PAD, BOS, EOS = 0, 1, 2
A, B, C = 4, 5, 6
VOCAB = 8

# Next-token probabilities by prefix (generated tokens); the mass an entry leaves over is spread
# evenly over the other tokens; a prefix not in the table ends with probability 0.99. The same
# table as tests/export/test_generate.py, so the walk-throughs below can be read side by side.
TABLE: dict[tuple[int, ...], dict[int, float]] = {
    (): {A: 0.6, EOS: 0.3, B: 0.08},
    (A,): {C: 0.9, EOS: 0.06},
    (B,): {EOS: 0.9},
    (A, C): {EOS: 0.99},
}


def table_log_probs(prefixes: list[tuple[int, ...]]) -> np.ndarray:
    """(len(prefixes), VOCAB) float32 log-probabilities looked up in TABLE."""
    rows = []
    for prefix in prefixes:
        given = TABLE.get(prefix, {EOS: 0.99})
        rest = (1.0 - sum(given.values())) / (VOCAB - len(given))
        rows.append([math.log(given.get(token, rest)) for token in range(VOCAB)])
    return np.array(rows, dtype=np.float32)


LogProbs = Callable[[list[tuple[int, ...]]], np.ndarray]


def run(
    options: SearchOptions, log_probs: LogProbs = table_log_probs, rows: bool = False
) -> list[SearchState]:
    """Every state of one sentence's search, from the start to done (stepped by `advance`, or by
    `advance_rows` when `rows`)."""
    states = [start_search(options)]
    while not states[-1].done:
        state = states[-1]
        if rows:
            moved = advance_rows([state], log_probs([b.tokens for b in state.live]))
            step = Advance(moved.states[0], moved.parents, moved.tokens)
        else:
            step = advance(state, log_probs([b.tokens for b in state.live]))
        assert list(step.tokens) == [b.tokens[-1] for b in step.state.live]
        for parent, beam in zip(step.parents, step.state.live, strict=True):
            assert beam.tokens[:-1] == state.live[parent].tokens
        states.append(step.state)
    return states


def hyp(tokens: list[int], probability: float, finished: bool = True) -> Hypothesis:
    return Hypothesis(tuple(tokens), math.log(probability), finished)


def assert_close(got: list[Hypothesis], want: list[Hypothesis], abs_tol: float = 1e-5) -> None:
    assert [(h.tokens, h.finished) for h in got] == [(h.tokens, h.finished) for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=abs_tol)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These tiny models run faster on one thread, and much faster when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- selection -----------------------------------------------------------------------------------


def test_greedy_takes_the_first_maximum() -> None:
    log_probs = np.array([[0.0, 0.0, -1.0], [-1.0, -0.5, -0.5], [-3.0, -2.0, -1.0]], dtype=np.float32)
    tokens, scores = greedy_select(log_probs)
    assert tokens.tolist() == [0, 1, 2] and tokens.dtype == np.int64
    assert scores.tolist() == [0.0, -0.5, -1.0] and scores.dtype == np.float32


def test_greedy_never_picks_a_banned_token_and_leaves_its_input_alone() -> None:
    log_probs = np.array(
        [[0.0, -1.0, -0.5, -0.5], [-2.0, 0.0, -3.0, -1.0], [-1.0, -1.0, 0.0, -2.0]], dtype=np.float32
    )
    before = log_probs.copy()
    tokens, scores = greedy_select(log_probs, banned=(0, 1))
    # row 0: its maximum is banned, the next best ties → the lower id; row 1 likewise; row 2 keeps its own
    assert tokens.tolist() == [2, 3, 2] and scores.tolist() == [-0.5, -1.0, 0.0]
    assert np.array_equal(log_probs, before)
    rng = np.random.default_rng(3)
    for _ in range(20):  # the same as masking the banned columns first
        rows = rng.normal(size=(16, VOCAB)).astype(np.float32)
        masked = rows.copy()
        masked[:, [PAD, BOS]] = -np.inf
        want, got = greedy_select(masked), greedy_select(rows, banned=(PAD, BOS))
        assert want[0].tolist() == got[0].tolist() and want[1].tolist() == got[1].tolist()


def test_top_candidates_is_a_stable_sort_of_the_negated_scores() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(-4, 1, size=30).astype(np.float32)  # many ties
        scores[rng.integers(0, 30, size=5)] = -np.inf
        for count in (1, 3, 8, 30, 40):
            want = np.argsort(-scores, kind="stable")[:count]
            assert top_candidates(scores, count).tolist() == want.tolist()


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="n_best"):
        SearchOptions(10, EOS, beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="beam_size"):
        SearchOptions(10, EOS, beam_size=0)
    with pytest.raises(ValueError, match="max_output_tokens"):
        SearchOptions(-1, EOS)


# --- greedy and beam search on the table ---------------------------------------------------------


def test_greedy_on_the_table() -> None:
    states = run(SearchOptions(5, EOS))
    assert [s.step for s in states] == [0, 1, 2, 3]
    assert_close(states[-1].hypotheses(), [hyp([A, C], 0.6 * 0.9 * 0.99)])
    cut = run(SearchOptions(2, EOS))[-1]
    assert_close(cut.hypotheses(), [hyp([A, C], 0.6 * 0.9, finished=False)])


def test_beam_bookkeeping_step_by_step() -> None:
    # Beam 2, α = 0. The leftover mass of a table entry is spread evenly, so "other" tokens tie and
    # the lowest id (PAD = 0) wins the tie.
    options = SearchOptions(5, EOS, beam_size=2, length_penalty=0.0, n_best=2)
    s0 = start_search(options)
    # Step 1: A (0.6) live, EOS (0.3, rank 1 < K) finished, B (0.08) live.
    a1 = advance(s0, table_log_probs([()]))
    assert a1.parents.tolist() == [0, 0] and a1.tokens.tolist() == [A, B]
    assert_close([r.hypothesis for r in a1.state.finished], [hyp([], 0.3)])
    # Step 2: A C (0.54) live; B EOS (0.072, rank 1) finished; A EOS (0.036, rank 2 ≥ K) skipped;
    # A PAD (0.6 · 0.04/6, a tie won by the lowest flat index) live. Two finished, but the live
    # A C beats both: the search goes on.
    a2 = advance(a1.state, table_log_probs([(A,), (B,)]))
    assert a2.parents.tolist() == [0, 0] and a2.tokens.tolist() == [C, PAD]
    assert [r.hypothesis.tokens for r in a2.state.finished] == [(), (B,)]
    assert not a2.state.done
    # Step 3: A C EOS and A PAD EOS finish; the best live beam (tiny) cannot beat the 2nd best
    # finished one: done, no rows left.
    a3 = advance(a2.state, table_log_probs([(A, C), (A, PAD)]))
    assert a3.state.done and a3.parents.size == 0 and a3.tokens.size == 0
    assert_close(a3.state.hypotheses(), [hyp([A, C], 0.6 * 0.9 * 0.99), hyp([], 0.3)])
    assert len(a3.state.finished) == 4


def test_length_limit_turns_live_beams_into_unfinished_hypotheses() -> None:
    options = SearchOptions(2, EOS, beam_size=2, length_penalty=0.0, n_best=2)
    (*_, last) = run(options)
    assert last.step == 2
    assert [(r.hypothesis.tokens, r.hypothesis.finished) for r in last.finished] == [
        ((), True),
        ((B,), True),
        ((A, C), False),
        ((A, PAD), False),
    ]
    assert_close(last.hypotheses(), [hyp([A, C], 0.54, finished=False), hyp([], 0.3)])


def test_zero_output_tokens() -> None:
    for beam_size in (1, 3):
        state = start_search(SearchOptions(0, EOS, beam_size=beam_size))
        assert state.done and state.hypotheses() == [Hypothesis((), 0.0, False)]


def test_length_penalty_ranks_the_n_best_list() -> None:
    options = SearchOptions(5, EOS, beam_size=2, length_penalty=1.0, n_best=2)
    (*_, last) = run(options)
    best = last.hypotheses()
    lengths = [len(h.tokens) + h.finished for h in best]
    normalized = [normalized_score(h.score, n, 1.0) for h, n in zip(best, lengths, strict=True)]
    assert normalized == sorted(normalized, reverse=True)
    assert best[0].tokens == (A, C)


# --- against the PyTorch reference ---------------------------------------------------------------


def model_log_probs(model: Transformer, source: list[int]) -> LogProbs:
    """Full recomputation with the PyTorch model: log-probs of the next token after each prefix."""
    src = torch.tensor([source])
    src_mask = (src != PAD)[:, None, None, :]
    with torch.no_grad():
        memory = model.encode(src, src_mask)

    def log_probs(prefixes: list[tuple[int, ...]]) -> np.ndarray:
        tgt = torch.tensor([[BOS, *p] for p in prefixes])
        mem = memory.expand(len(prefixes), -1, -1)
        with torch.no_grad():
            hidden = model.decode(mem, src_mask, tgt, model.target_mask(tgt))
            return F.log_softmax(model.logits(hidden[:, -1]), dim=-1).numpy()

    return log_probs


SOURCES = [[5, 9, 11, 2], [7, 8, 12, 13, 14, 15, 4, 2], [19, 2], [6, 6, 17, 10, 2]]


def eos_biased_model(tiny_model, eos_bias: float) -> Transformer:
    """A random model with a logit bias on the end token, so that hypotheses end at varied steps
    (a plain random model never ends within a few tokens, which would leave the stopping rule
    untested)."""
    model = tiny_model(seed=3, vocab_size=20, final_logits_bias=True)
    with torch.no_grad():
        model.logits_bias[EOS] = eos_bias
    return model


@pytest.mark.parametrize("eos_bias", [0.0, 2.0, 2.5])
@pytest.mark.parametrize(("beam_size", "length_penalty"), [(1, 1.0), (2, 0.0), (3, 0.6), (4, 1.0)])
def test_search_matches_export_generate(
    tiny_model, padded, eos_bias: float, beam_size: int, length_penalty: float
) -> None:
    model = eos_biased_model(tiny_model, eos_bias)
    limit = 8
    src = padded(SOURCES)
    if beam_size == 1:
        want = [[h] for h in greedy_decode(model, src, limit)]
    else:
        want = beam_search(
            model, src, limit, beam_size=beam_size, length_penalty=length_penalty, n_best=beam_size
        )
    for source, expected in zip(SOURCES, want, strict=True):
        options = SearchOptions(limit, EOS, beam_size, length_penalty, n_best=beam_size)
        got = run(options, model_log_probs(model, source))[-1].hypotheses()
        assert_close(got, [Hypothesis(tuple(h.tokens), h.score, h.finished) for h in expected])
        assert run(options, model_log_probs(model, source), rows=True)[-1].hypotheses() == got


# --- several sentences in one step ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab", "ties"),
    # 8: every candidate sorted; 300: one strided group per token and a tail; 1000: groups of 3,
    # halved; ties: logits on a coarse grid, so that candidates tie at the 2K-th place
    [(VOCAB, False), (300, True), (1000, False), (1000, True)],
)
def test_advance_rows_equals_advance_sentence_by_sentence(vocab: int, ties: bool) -> None:
    """Greedy rows chosen together (with differing banned sets), beams of several sizes, sampling,
    forced prefixes and min lengths side by side in one step, step after step, until every sentence
    is done."""
    rng = np.random.default_rng(7)
    kinds = [
        SearchOptions(9, EOS, never_ids=(PAD, BOS)),
        SearchOptions(9, EOS, never_ids=(PAD,)),
        SearchOptions(9, EOS, 3, 1.0, 2, never_ids=(PAD, BOS)),
        SearchOptions(9, EOS, never_ids=(PAD, BOS), sampling=Sampling(0.8, 3, 0.9, seed=5)),
        SearchOptions(9, EOS, never_ids=(PAD, BOS), forced_prefix=(C, A)),
        SearchOptions(9, EOS, never_ids=(PAD, BOS), min_output_tokens=3),
        SearchOptions(1, EOS, never_ids=(PAD, BOS)),
        SearchOptions(9, EOS, 4, 0.6, 4, never_ids=(PAD, BOS)),
        SearchOptions(9, EOS, 2, 0.0, 1, never_ids=(PAD, BOS), min_output_tokens=2),
        SearchOptions(8, EOS, 5, 1.0, 3, never_ids=(PAD, BOS), forced_prefix=(A,)),
    ]
    together = [start_search(o) for o in kinds * 2]
    alone = list(together)
    while not all(s.done for s in together):
        live = [i for i, s in enumerate(together) if not s.done]
        rows = sum(len(together[i].live) for i in live)
        logits = rng.normal(size=(rows, vocab)) * 2
        logits[:, EOS] += rng.uniform(0, 6, size=rows)  # hypotheses end at varied steps
        if ties:
            logits = np.round(logits)
        logits[rng.random(size=logits.shape) < 0.02] = -np.inf  # tokens a model rules out
        log_probs = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
        moved = advance_rows([together[i] for i in live], log_probs)
        first, parents, tokens = 0, [], []
        for i, state in zip(live, moved.states, strict=True):
            step = advance(alone[i], log_probs[first : first + len(alone[i].live)])
            assert state == step.state
            parents += list(first + step.parents)
            tokens += list(step.tokens)
            first += len(alone[i].live)
            together[i] = alone[i] = state
        assert list(moved.parents) == parents and list(moved.tokens) == tokens
    assert all(s.hypotheses() for s in together)


# --- sampling, minimum length, forced prefix -------------------------------------------------------


def test_sampling_with_top_k_1_or_a_tiny_top_p_is_greedy() -> None:
    greedy = run(SearchOptions(5, EOS))[-1].hypotheses()
    for sampling in (Sampling(top_k=1, seed=3), Sampling(top_p=1e-6, seed=4), Sampling(temperature=1e-3)):
        assert run(SearchOptions(5, EOS, sampling=sampling))[-1].hypotheses() == greedy


def test_sampling_is_reproducible_and_follows_the_distribution() -> None:
    log_probs = np.full(VOCAB, -np.inf, dtype=np.float32)
    log_probs[[A, B]] = np.log([0.7, 0.3])
    draws = [sample_select(log_probs, Sampling(seed=seed), step=0) for seed in range(4000)]
    assert set(draws) == {A, B}
    assert draws.count(A) / len(draws) == pytest.approx(0.7, abs=0.03)
    assert draws == [sample_select(log_probs, Sampling(seed=seed), step=0) for seed in range(4000)]
    # Temperature: below 1 sharpens towards the likelier token, above 1 flattens.
    sharp = [sample_select(log_probs, Sampling(temperature=0.3, seed=s), 0) for s in range(2000)]
    flat = [sample_select(log_probs, Sampling(temperature=3.0, seed=s), 0) for s in range(2000)]
    assert sharp.count(A) / 2000 > 0.9 and 0.45 < flat.count(A) / 2000 < 0.65
    # top_p 0.5 keeps only A (its 0.7 already reaches 0.5).
    assert {sample_select(log_probs, Sampling(top_p=0.5, seed=s), 0) for s in range(200)} == {A}


def test_sampled_scores_are_model_log_probs() -> None:
    (state,) = run(SearchOptions(5, EOS, sampling=Sampling(temperature=2.0, seed=11)))[-1:]
    (h,) = state.hypotheses()
    prefixes = [h.tokens[:i] for i in range(len(h.tokens) + 1)]
    chosen = [*h.tokens, EOS]
    want = sum(float(table_log_probs([p])[0, t]) for p, t in zip(prefixes, chosen, strict=True))
    assert h.score == pytest.approx(want, abs=1e-5)


def test_min_output_tokens_holds_the_end_token_back() -> None:
    # The table's best first token is A, then C, then the end: at least 3 tokens are forced.
    (h,) = run(SearchOptions(8, EOS, min_output_tokens=3))[-1].hypotheses()
    assert len(h.tokens) >= 3 and h.finished
    (b,) = run(SearchOptions(8, EOS, beam_size=3, min_output_tokens=3))[-1].hypotheses()
    assert len(b.tokens) >= 3


def test_forced_prefix_is_followed_then_decoding_goes_on() -> None:
    for beam_size in (1, 3):
        (h,) = run(SearchOptions(6, EOS, beam_size=beam_size, forced_prefix=(B, C)))[-1].hypotheses()
        assert h.tokens[:2] == (B, C)
        prefixes = [h.tokens[:i] for i in range(len(h.tokens) + 1)]
        chosen = [*h.tokens, EOS] if h.finished else list(h.tokens)
        want = sum(float(table_log_probs([p])[0, t]) for p, t in zip(prefixes, chosen, strict=False))
        assert h.score == pytest.approx(want, abs=1e-5)


def test_a_forced_start_is_followed_and_scores_zero() -> None:
    """A multilingual model's language token: imposed like Transformers' forced BOS token (log-prob
    0), before any target prefix (whose log-probs count)."""
    for beam_size in (1, 3):
        plain = run(SearchOptions(6, EOS, beam_size=beam_size, forced_prefix=(B, C)))[-1].hypotheses()
        started = run(SearchOptions(6, EOS, beam_size=beam_size, forced_start=(A,), forced_prefix=(B, C)))[
            -1
        ].hypotheses()
        (h,) = started
        assert h.tokens[:3] == (A, B, C)
        prefixes = [h.tokens[:i] for i in range(1, len(h.tokens) + 1)]
        chosen = [*h.tokens[1:], EOS] if h.finished else list(h.tokens[1:])
        want = sum(float(table_log_probs([p])[0, t]) for p, t in zip(prefixes, chosen, strict=False))
        assert h.score == pytest.approx(want, abs=1e-5)
        assert plain[0].tokens[:2] == (B, C)


def test_forced_eos_at_limit_ends_every_hypothesis_at_the_last_step() -> None:
    """Transformers' forced_eos_token_id: at the last step allowed, the end token, log-prob 0."""
    never_ends = {(): {A: 0.9}, (A,): {A: 0.9}, (A, A): {A: 0.9}}

    def log_probs(prefixes: list[tuple[int, ...]]) -> np.ndarray:
        rows = []
        for prefix in prefixes:
            given = never_ends.get(prefix, {A: 0.9})
            rest = (1.0 - sum(given.values())) / (VOCAB - len(given))
            rows.append([math.log(given.get(t, rest)) for t in range(VOCAB)])
        return np.array(rows, dtype=np.float32)

    for beam_size in (1, 2):
        plain = run(SearchOptions(3, EOS, beam_size=beam_size), log_probs)[-1].hypotheses()[0]
        forced = run(SearchOptions(3, EOS, beam_size=beam_size, forced_eos_at_limit=True), log_probs)
        (h,) = forced[-1].hypotheses()
        assert (plain.tokens, plain.finished) == ((A, A, A), False)
        assert (h.tokens, h.finished) == ((A, A), True)
        assert h.score == pytest.approx(2 * math.log(0.9), abs=1e-6)  # the end token adds 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forced_start": (A, B), "forced_prefix": (C, A, B)}, "leaves no room"),
        ({"forced_start": (EOS,)}, "must not contain the end token"),
        ({"sampling": Sampling(), "beam_size": 2}, "beam_size must be 1"),
        ({"min_output_tokens": 5}, "below max_output_tokens 5"),
        ({"min_output_tokens": -1}, "must not be negative"),
        ({"forced_prefix": (A, B, C, A, B)}, "leaves no room"),
        ({"forced_prefix": (A, EOS)}, "must not contain the end token"),
    ],
)
def test_bad_options_are_refused_with_the_limit(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchOptions(5, EOS, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": 0.0}, "greater than 0"), ({"top_p": 0.0}, r"\(0, 1\]"), ({"top_k": -1}, "negative")],
)
def test_bad_sampling_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
