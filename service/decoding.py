"""Decoding math, pure: next-token selection and beam-search bookkeeping.

Numpy in, numpy out; no onnxruntime, no torch. The semantics are those of `docs/model-directory.md`
and reproduce `export/generate.py` token for token:

- Greedy: the first maximum of the log-probabilities (ties to the lowest id).
- Beam search (beam K, length penalty α), per sentence: the 2K best continuations of the live beams,
  ranked by summed log-prob with ties to the lower flat index beam·V + token; an end-token
  continuation is finished when it ranks among the first K, else skipped; the others refill the
  live beams in rank order (up to K). The sentence stops once ≥ K hypotheses have finished and the
  best live score / step^α ≤ the K-th best finished normalized score; at the length limit the live
  beams become unfinished hypotheses. Hypotheses rank by score / length^α (the end token counts).

Scores are summed in float32, as the reference does, so that rankings tie the same way.

A sentence's search is a `SearchState` (frozen); `advance` takes the log-probabilities of its live
rows and returns the next state plus, for each new live beam, its parent row and the token it
feeds next. Rows of many sentences (of different requests) can therefore share one decoder step:
the caller slices the step's log-probs per sentence and reorders the cache with the parents
(`service.engine.kv_cache.KVCache.keep`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# --- results and options ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hypothesis:
    """A decoded output: the torch-free twin of `export.generate.Hypothesis`."""

    tokens: tuple[int, ...]  # generated ids, without the start token and without the end token
    score: float  # sum of log-probabilities (float32 arithmetic), end token included when produced
    finished: bool  # True when the end token was produced, False when the length limit stopped it
    # the log-probability of each token at its step, then the end token's when produced (so one more
    # than `tokens` when finished); empty from export.generate, which keeps only the sum
    token_log_probs: tuple[float, ...] = ()

    @property
    def length(self) -> int:
        """Generated tokens with the end token (when produced): what length penalties divide by,
        and what Translation.output_tokens and the output-token metric count."""
        return len(self.tokens) + int(self.finished)


@dataclass(frozen=True)
class Sampling:
    """Draw the next token instead of taking the best: from softmax(log p / temperature), kept to
    the `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`."""

    temperature: float = 1.0  # > 0; below 1 sharpens, above 1 flattens
    top_k: int = 0  # keep the k most likely tokens; 0: no limit
    top_p: float = 1.0  # nucleus: keep the most likely tokens up to this total probability, in (0, 1]
    seed: int = 0  # with the step number, the only source of randomness: a draw is reproducible

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature} must be greater than 0 when sampling")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must not be negative (0: no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")


@dataclass(frozen=True)
class SearchOptions:
    """How one sentence is decoded."""

    max_output_tokens: int  # decoder steps at most (the end token included)
    eos_id: int  # the end token
    beam_size: int = 1  # K; 1 is greedy
    length_penalty: float = 1.0  # α in score / length^α (beam ranking and stopping)
    n_best: int = 1  # hypotheses returned, best first; at most beam_size
    never_ids: tuple[int, ...] = ()  # tokens never chosen (padding, the start token), as in export.generate
    min_output_tokens: int = 0  # tokens generated before the end token may be chosen (end token excluded)
    # The first tokens, imposed: `forced_start` scored 0 (a multilingual model's target-language
    # token, as Transformers' forced BOS token), then `forced_prefix` scored by the model.
    forced_start: tuple[int, ...] = ()
    forced_prefix: tuple[int, ...] = ()
    # The end token imposed (log-prob 0) as the last token max_output_tokens allows, as
    # Transformers' forced_eos_token_id does for the checkpoints that ship it.
    forced_eos_at_limit: bool = False
    sampling: Sampling | None = None  # draw instead of taking the best (beam_size 1 only)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size {self.beam_size} must be at least 1")
        if self.sampling is not None and self.beam_size != 1:
            raise ValueError(f"sampling draws one sequence: beam_size must be 1, not {self.beam_size}")
        if self.min_output_tokens < 0:
            raise ValueError(f"min_output_tokens {self.min_output_tokens} must not be negative")
        if self.min_output_tokens and self.min_output_tokens >= self.max_output_tokens:
            raise ValueError(
                f"min_output_tokens {self.min_output_tokens} must be below max_output_tokens "
                f"{self.max_output_tokens} (which counts the end token)"
            )
        if self.forced and len(self.forced) >= self.max_output_tokens:
            raise ValueError(
                f"the forced prefix has {len(self.forced)} tokens; max_output_tokens "
                f"{self.max_output_tokens} leaves no room after it"
            )
        if self.eos_id in self.forced:
            raise ValueError("the forced prefix must not contain the end token")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best {self.n_best} must be between 1 and beam_size {self.beam_size}")
        if self.max_output_tokens < 0:
            raise ValueError(f"max_output_tokens {self.max_output_tokens} must not be negative")

    @property
    def forced(self) -> tuple[int, ...]:
        """Every imposed token, in order."""
        return self.forced_start + self.forced_prefix


def normalized_score(score: float, length: int, length_penalty: float) -> float:
    """score / length^α, with length at least 1."""
    return score / (max(length, 1) ** length_penalty)


# --- next-token selection ------------------------------------------------------------------------


def greedy_select(log_probs: np.ndarray, banned: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The first maximum of each row, never a `banned` token.

    Args:
        log_probs: (B, V) float; not written.
        banned: token ids never chosen (their entries count as -inf).
    Returns:
        (tokens (B,) int64, their log-probabilities (B,) float32).
    """
    tokens = np.argmax(log_probs, axis=-1)  # (B,): argmax returns the first maximum
    if banned:
        # Masking only lowers the banned entries, so a row whose first maximum is not banned keeps
        # it; only the rows that picked a banned token are masked (a copy) and chosen again.
        hit = tokens == banned[0]
        for token in banned[1:]:  # a few ids: cheaper than np.isin's sort
            hit |= tokens == token
        again = np.flatnonzero(hit)
        if len(again):
            masked = log_probs[again]
            masked[:, list(banned)] = -np.inf
            tokens[again] = np.argmax(masked, axis=-1)
    best = log_probs[np.arange(len(tokens)), tokens]  # (B,)
    return tokens.astype(np.int64), best.astype(np.float32)


def sample_select(log_probs: np.ndarray, sampling: Sampling, step: int) -> int:
    """One draw from a row of log-probabilities (V,) under `sampling`.

    The random numbers come from (seed, step) alone, so a request's draws do not depend on which
    other requests share its batch or on their order: sampling is reproducible and batch-invariant.
    """
    logits = log_probs.astype(np.float64) / sampling.temperature
    order = np.argsort(-logits, kind="stable")  # most likely first, ties to the lower id
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(logits[order] - logits[order[0]])  # -inf (banned tokens) becomes 0
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1  # reaches top_p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    rng = np.random.default_rng([sampling.seed, step])
    return int(order[rng.choice(len(order), p=probs)])


def top_candidates(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest entries of a flat vector, best first, ties to the lower index.

    The order of a stable sort of the negated scores, computed in O(n) plus a sort of the few
    entries that reach the count-th largest value (every tie at that value is kept, so the
    tie-break stays exact). NaN is not supported.

    Args:
        scores: (N,) float.
    Returns:
        (min(count, N),) int64 indices into `scores`.
    """
    n = scores.size
    if count < n:
        threshold = np.partition(scores, n - count)[n - count]  # the count-th largest value
        pool = np.flatnonzero(scores >= threshold)  # ascending: the lower index first among ties
    else:
        pool = np.arange(n)
    order = np.argsort(-scores[pool], kind="stable")
    return pool[order[:count]].astype(np.int64)


# --- one sentence's search -----------------------------------------------------------------------


@dataclass(frozen=True)
class Beam:
    """A live hypothesis: one row of the next decoder step."""

    tokens: tuple[int, ...]  # generated so far; the last one is what the row feeds next
    score: float  # float32 sum of their log-probabilities
    log_probs: tuple[float, ...] = ()  # of each token


@dataclass(frozen=True)
class Ranked:
    """A hypothesis with the normalized score it is ranked by."""

    normalized: float
    hypothesis: Hypothesis


@dataclass(frozen=True)
class SearchState:
    """One sentence between two decoder steps. Done when no beam is live."""

    options: SearchOptions
    step: int = 0  # decoder steps taken = tokens generated by every live beam
    live: tuple[Beam, ...] = (Beam((), 0.0),)  # rank order; the first step runs the start token alone
    finished: tuple[Ranked, ...] = ()  # in the order they were produced (ranking is stable)

    @property
    def done(self) -> bool:
        return not self.live

    def hypotheses(self) -> list[Hypothesis]:
        """The `n_best` best hypotheses by normalized score, best first (ties: the earlier one)."""
        ranked = sorted(self.finished, key=lambda r: r.normalized, reverse=True)
        return [r.hypothesis for r in ranked[: self.options.n_best]]


@dataclass(frozen=True, eq=False)
class Advance:
    """What one decoder step did to a sentence."""

    state: SearchState
    parents: np.ndarray = field(repr=False)  # (n_live,) int64: the previous live row of each new beam
    tokens: np.ndarray = field(repr=False)  # (n_live,) int64: the token each new beam feeds next


def start_search(options: SearchOptions) -> SearchState:
    """The state before the first decoder step (already done when max_output_tokens is 0)."""
    return _at_limit(SearchState(options))


def advance(state: SearchState, log_probs: np.ndarray) -> Advance:
    """One decoder step of one sentence.

    Args:
        state: not done.
        log_probs: (len(state.live), V) float, the step's output for the live rows, in order.
    Returns:
        The next state with the parent row and next token of each of its live beams.
    """
    assert not state.done, "advance() on a finished search"
    assert log_probs.shape[0] == len(state.live), (log_probs.shape, len(state.live))
    opts = state.options
    banned = _banned(state)
    if banned:
        # They keep their share of the softmax (scores stay model log-probs); they are never picked.
        log_probs = log_probs.copy()
        log_probs[:, list(banned)] = -np.inf
    if state.step < len(opts.forced):
        return _forced_advance(
            state, log_probs, opts.forced[state.step], state.step >= len(opts.forced_start)
        )
    if _eos_forced(state):
        log_probs = np.full_like(log_probs, -np.inf)
        log_probs[:, opts.eos_id] = 0.0
    if opts.beam_size == 1:
        return _greedy_advance(state, log_probs)
    return _beam_advance(state, log_probs)


@dataclass(frozen=True, eq=False)
class RowsAdvance:
    """What one decoder step did to the sentences sharing it (`advance_rows`)."""

    states: list[SearchState]  # the next state of each sentence, in order
    parents: np.ndarray = field(repr=False)  # (R',) int64: the step's row that each new row continues
    tokens: np.ndarray = field(repr=False)  # (R',) int64: the token each new row feeds next


def advance_rows(states: Sequence[SearchState], log_probs: np.ndarray) -> RowsAdvance:
    """`advance` for every sentence of a step whose rows are the sentences' live beams, in order.

    Exactly `advance`'s result sentence by sentence, without its per-sentence numpy calls (at batch
    32 that per-sentence work cost as much as the decoder step):
    - plain greedy sentences (no sampling, no forced token left): one argmax per distinct set of
      banned tokens, their scores summed in one float32 add;
    - plain beam sentences: their 2K best continuations chosen together (`_plain_beams`);
    - the others go through `advance` on their own rows.

    Args:
        states: not done; together they have R live beams.
        log_probs: (R, V) float, the step's output, sentence after sentence.
    """
    firsts: list[int] = []  # each sentence's first row
    greedy: dict[tuple[int, ...], list[int]] = {}  # banned tokens → the greedy sentences banning them
    beams: list[int] = []  # the plain beam sentences
    rows = 0
    for i, state in enumerate(states):
        firsts.append(rows)
        rows += len(state.live)
        opts, step = state.options, state.step
        forced = step < len(opts.forced_start) + len(opts.forced_prefix)
        if forced or (opts.forced_eos_at_limit and step == opts.max_output_tokens - 1):
            continue
        if opts.beam_size > 1:
            beams.append(i)
        elif opts.sampling is None:
            greedy.setdefault(_banned(state), []).append(i)
    assert log_probs.shape[0] == rows, (log_probs.shape, rows)
    # sentence → its next state, the step's rows its new rows continue and the tokens they feed
    moves: dict[int, tuple[SearchState, list[int], list[int]]] = {}
    for banned, members in greedy.items():
        _plain_greedy(states, members, firsts, log_probs, banned, moves)
    if beams:
        _plain_beams(states, beams, firsts, log_probs, moves)
    next_states: list[SearchState] = []
    parents: list[int] = []
    next_tokens: list[int] = []
    for i, state in enumerate(states):
        move = moves.get(i)
        if move is None:
            alone = advance(state, log_probs[firsts[i] : firsts[i] + len(state.live)])
            move = (alone.state, (firsts[i] + alone.parents).tolist(), alone.tokens.tolist())
        next_states.append(move[0])
        parents += move[1]
        next_tokens += move[2]
    return RowsAdvance(
        next_states, np.asarray(parents, dtype=np.int64), np.asarray(next_tokens, dtype=np.int64)
    )


def _plain_greedy(
    states: Sequence[SearchState],
    members: list[int],
    firsts: list[int],
    log_probs: np.ndarray,
    banned: tuple[int, ...],
    moves: dict[int, tuple[SearchState, list[int], list[int]]],
) -> None:
    """The greedy choice of `members` (sentences banning `banned`, one row each) into `moves`."""
    rows = [firsts[i] for i in members]
    if len(rows) == 1:  # batch 1: a row's argmax in plain Python costs a few numpy calls less
        values = log_probs[rows[0]]  # (V,)
        token = int(values.argmax())
        if token in banned:
            masked = values.copy()
            masked[list(banned)] = -np.inf
            token = int(masked.argmax())
        value = np.float32(values[token])
        picks = [(token, float(value), float(np.float32(states[members[0]].live[0].score) + value))]
    else:
        consecutive = rows[-1] - rows[0] == len(rows) - 1  # the usual case: a view, no copy
        picked = log_probs[rows[0] : rows[-1] + 1] if consecutive else log_probs[rows]
        tokens, best = greedy_select(picked, banned)
        scores = np.array([states[i].live[0].score for i in members], dtype=np.float32) + best
        picks = list(zip(tokens.tolist(), best.tolist(), scores.tolist(), strict=True))
    for i, row, (token, token_log_prob, score) in zip(members, rows, picks, strict=True):
        moved = _greedy_moved(states[i], token, token_log_prob, score)
        moves[i] = (moved, [], []) if moved.done else (moved, [row], [token])


def _plain_beams(
    states: Sequence[SearchState],
    members: list[int],
    firsts: list[int],
    log_probs: np.ndarray,
    moves: dict[int, tuple[SearchState, list[int], list[int]]],
) -> None:
    """One beam step of `members` (sentences with no forced token left) into `moves`: `_beam_advance`
    for all of them at once.

    Selecting each sentence's 2K best of its n·V candidates with a partition cost ~6 ns per candidate;
    instead, the maxima of disjoint groups of each row's candidates (a few vectorized halvings, ~0.1
    ns per candidate) give a threshold T per sentence, the 2K-th largest of its group maxima: T is at
    most its 2K-th best candidate, so every candidate that can rank among the first 2K is ≥ T.
    Those few are then sorted together (score descending, ties to the lower flat index beam·V +
    token), and the bookkeeping of `_beam_advance` runs on Python lists.
    """
    counts = [len(states[i].live) for i in members]
    rows = [r for i, n in zip(members, counts, strict=True) for r in range(firsts[i], firsts[i] + n)]
    consecutive = rows[-1] - rows[0] == len(rows) - 1
    lp = log_probs[rows[0] : rows[-1] + 1] if consecutive else log_probs[rows]
    lp = lp.astype(np.float32, copy=False)  # (R, V): the members' rows
    vocab = lp.shape[1]
    scores = np.array([b.score for i in members for b in states[i].live], dtype=np.float32)  # (R,)
    candidates = lp + scores[:, None]  # (R, V) float32, a new array: the banned ones are masked in it
    banned_rows: dict[tuple[int, ...], list[int]] = {}  # banned tokens → the rows banning them
    first_row = 0
    for i, n in zip(members, counts, strict=True):
        banned_rows.setdefault(_banned(states[i]), []).extend(range(first_row, first_row + n))
        first_row += n
    for banned, where in banned_rows.items():
        if banned and len(where) == len(rows):
            candidates[:, list(banned)] = -np.inf
        elif banned:
            candidates[np.ix_(where, banned)] = -np.inf
    thresholds = _beam_thresholds(candidates, counts, [states[i].options.beam_size for i in members])
    flat = np.flatnonzero(candidates >= np.repeat(thresholds, counts)[:, None])  # (P,) ascending
    values = candidates.ravel()[flat]
    sentence_of = np.repeat(np.arange(len(members)), counts)[flat // vocab]
    order = np.lexsort((flat, -values, sentence_of))  # by sentence, score descending, lower index
    flat = flat[order]
    pooled = np.bincount(sentence_of, minlength=len(members)).tolist()
    flat_list, value_list, log_prob_list = flat.tolist(), values[order].tolist(), lp.ravel()[flat].tolist()
    start, first_row = 0, 0  # of the sentence's candidates, of its rows among the members'
    for i, n, count in zip(members, counts, pooled, strict=True):
        end = start + count
        moves[i] = _beam_moved(
            states[i],
            (firsts[i] - first_row, first_row, vocab),
            flat_list[start:end],
            value_list[start:end],
            log_prob_list[start:end],
        )
        start, first_row = end, first_row + n


def _beam_thresholds(candidates: np.ndarray, counts: list[int], beam_sizes: list[int]) -> np.ndarray:
    """Per sentence (its `counts[j]` rows of `candidates`, beam K = `beam_sizes[j]`), a value at most
    its 2K-th largest candidate: the 2K-th largest maximum of disjoint groups of its candidates.

    Returns:
        (len(counts),) float32.
    """
    least = max(16, 2 * max(beam_sizes))  # groups per row: enough for a bound, few to partition
    rows, vocab = candidates.shape
    # (R, c): each entry the maximum of a group of a row's candidates. First 256 strided groups in
    # one call (column t in group t mod 256), then halvings, each a single vectorized maximum.
    groups = min(vocab, 256)
    width = vocab // groups
    maxima = candidates[:, : groups * width].reshape(rows, width, groups).max(axis=1)
    if vocab > groups * width:
        tail = vocab - groups * width  # fewer than `groups`: each joins one of the first groups
        np.maximum(maxima[:, :tail], candidates[:, groups * width :], out=maxima[:, :tail])
    while maxima.shape[1] // 2 >= least:
        width, half = maxima.shape[1], maxima.shape[1] // 2
        halved = np.maximum(maxima[:, :half], maxima[:, half : 2 * half])
        if width % 2:  # the odd column joins the first group
            np.maximum(halved[:, 0], maxima[:, -1], out=halved[:, 0])
        maxima = halved
    groups = maxima.shape[1]
    thresholds = np.full(len(counts), -np.inf, dtype=np.float32)
    firsts = [0, *itertools.accumulate(counts[:-1])]
    shapes: dict[tuple[int, int], list[int]] = {}  # (rows, K) → the sentences of that shape
    for j, shape in enumerate(zip(counts, beam_sizes, strict=True)):
        shapes.setdefault(shape, []).append(j)
    for (n, k), js in shapes.items():
        pool = n * groups
        if pool < 2 * k:  # a tiny vocabulary: no bound, every candidate is sorted
            continue
        if len(js) == len(counts):  # every sentence has this shape: the rows in order
            sentence_maxima = maxima.reshape(len(js), pool)
        else:
            sentence_maxima = maxima[[firsts[j] + b for j in js for b in range(n)]].reshape(len(js), pool)
        thresholds[js] = np.partition(sentence_maxima, pool - 2 * k, axis=1)[:, pool - 2 * k]
    return thresholds


def _beam_moved(
    state: SearchState,
    where: tuple[int, int, int],
    flats: list[int],
    scores: list[float],
    token_log_probs: list[float],
) -> tuple[SearchState, list[int], list[int]]:
    """`_beam_advance`'s bookkeeping on a sentence's candidates, best first (at least its first 2K):
    their flat indices row·V + token among the members' rows, float32 scores and log-probs.
    `where` is (base, first, V): base + row is the step's row, base + first the sentence's first.
    Returns the next state, the step's rows its new live beams continue and the tokens they feed."""
    opts, step = state.options, state.step + 1
    k, eos = opts.beam_size, opts.eos_id
    base, first, vocab = where
    live: list[Beam] = []
    parents: list[int] = []
    next_tokens: list[int] = []
    finished = list(state.finished)
    for rank in range(min(len(flats), 2 * k)):
        score = scores[rank]
        if score == -np.inf:
            break
        row, token = divmod(flats[rank], vocab)
        parent = state.live[row - first]
        if token == eos:
            if rank < k:  # an end token ranked below the first K is skipped, not finished
                hyp = Hypothesis(parent.tokens, score, True, (*parent.log_probs, token_log_probs[rank]))
                finished.append(Ranked(normalized_score(score, step, opts.length_penalty), hyp))
            continue
        live.append(Beam((*parent.tokens, token), score, (*parent.log_probs, token_log_probs[rank])))
        parents.append(base + row)
        next_tokens.append(token)
        if len(live) == k:
            break
    if len(finished) >= k:
        # Stop once the best live beam, judged at the current length, cannot beat the K-th best
        # finished hypothesis (exact for α = 0, where scores only fall).
        kth_best = sorted((r.normalized for r in finished), reverse=True)[k - 1]
        if not live or normalized_score(live[0].score, step, opts.length_penalty) <= kth_best:
            live = []
    moved = _at_limit(SearchState(opts, step, tuple(live), tuple(finished)))
    return (moved, [], []) if moved.done else (moved, parents, next_tokens)


def _greedy_moved(state: SearchState, token: int, token_log_prob: float, score: float) -> SearchState:
    """`_greedy_next` with the float32 sum already done (`score`): the hot path of `advance_rows`."""
    (beam,), step, opts = state.live, state.step + 1, state.options
    if token == opts.eos_id:
        hyp = Hypothesis(beam.tokens, score, True, (*beam.log_probs, token_log_prob))
        ranked = Ranked(normalized_score(score, step, opts.length_penalty), hyp)
        return SearchState(opts, step, (), (*state.finished, ranked))
    moved = SearchState(
        opts, step, (Beam((*beam.tokens, token), score, (*beam.log_probs, token_log_prob)),), state.finished
    )
    return _at_limit(moved)


def _banned(state: SearchState) -> tuple[int, ...]:
    """Tokens this step must not pick: the never-ids, and the end token before min_output_tokens."""
    opts = state.options
    return (*opts.never_ids, *((opts.eos_id,) if state.step < opts.min_output_tokens else ()))


def _eos_forced(state: SearchState) -> bool:
    """Whether this step must take the end token (the last step of forced_eos_at_limit)."""
    opts = state.options
    return opts.forced_eos_at_limit and state.step == opts.max_output_tokens - 1


def _forced_advance(state: SearchState, log_probs: np.ndarray, token: int, scored: bool) -> Advance:
    """Every live beam takes the imposed token (at the start there is one beam, so one stays),
    adding its log-prob to the score when `scored`, else 0."""
    step = state.step + 1
    live = tuple(
        _extended(beam, token, np.float32(log_probs[row, token] if scored else 0.0))
        for row, beam in enumerate(state.live)
    )
    moved = SearchState(state.options, step, live, state.finished)
    return _moved(_at_limit(moved), range(len(live)))


def _greedy_advance(state: SearchState, log_probs: np.ndarray) -> Advance:
    sampling = state.options.sampling
    if sampling is None:
        tokens, best = greedy_select(log_probs)  # (1,), (1,)
        token, token_log_prob = int(tokens[0]), best[0]
    else:
        token = sample_select(log_probs[0], sampling, state.step)
        token_log_prob = np.float32(log_probs[0, token])
    moved = _greedy_next(state, token, token_log_prob)
    return _moved(moved, [] if moved.done else [0])


def _greedy_next(state: SearchState, token: int, token_log_prob: np.float32) -> SearchState:
    """The state after the one live beam takes `token` (the end token finishes it)."""
    score = float(np.float32(state.live[0].score) + token_log_prob)  # float32, as the reference sums
    return _greedy_moved(state, token, float(token_log_prob), score)


def _extended(beam: Beam, token: int, log_prob: np.float32) -> Beam:
    """`beam` followed by `token` (the score summed in float32, as the reference does)."""
    return Beam(
        (*beam.tokens, token), float(np.float32(beam.score) + log_prob), (*beam.log_probs, float(log_prob))
    )


def _beam_advance(state: SearchState, log_probs: np.ndarray) -> Advance:
    """One sentence's beam step: its 2K best continuations by a partition (`top_candidates`),
    then the bookkeeping every beam step shares (`_beam_moved`)."""
    lp = log_probs.astype(np.float32, copy=False)
    scores = np.array([b.score for b in state.live], dtype=np.float32)  # (n,)
    candidates = (scores[:, None] + lp).ravel()  # (n·V,)
    best = top_candidates(candidates, 2 * state.options.beam_size)
    where = (0, 0, lp.shape[1])
    moved, parents, _ = _beam_moved(
        state, where, best.tolist(), candidates[best].tolist(), lp.ravel()[best].tolist()
    )
    return _moved(moved, parents)


def _at_limit(state: SearchState) -> SearchState:
    """At the length limit the live beams become unfinished hypotheses."""
    if state.done or state.step < state.options.max_output_tokens:
        return state
    opts = state.options
    length = opts.max_output_tokens
    unfinished = tuple(
        Ranked(
            normalized_score(b.score, length, opts.length_penalty),
            Hypothesis(b.tokens, b.score, False, b.log_probs),
        )
        for b in state.live
    )
    return SearchState(opts, state.step, (), state.finished + unfinished)


def _moved(state: SearchState, parents: Sequence[int]) -> Advance:
    """The Advance of a new state; parents are dropped (and tokens empty) when the search is done."""
    if state.done:
        parents = []
    tokens = [b.tokens[-1] for b in state.live]
    return Advance(state, np.asarray(parents, dtype=np.int64), np.asarray(tokens, dtype=np.int64))


def default_max_output_tokens(source_tokens: int, max_positions: int) -> int:
    """A translation rarely needs more than twice the source plus a margin."""
    return min(max_positions, 2 * source_tokens + 10)
