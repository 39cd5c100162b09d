"""The minimal decoding loop over the ONNX graphs: encoder once, then KV-cached decoder steps.

One padded batch of sentences decodes in lockstep: every decoder step runs the live rows of all
unfinished sentences (one row per greedy sentence, up to K per beam sentence), the pure search
of `service.decoding` picks the next tokens, and the cache rows follow the beams' back-pointers.
The server's engine builds on these pieces; this loop is the plain, batch-at-once reference, and
`translate_ids_without_cache` the same search without a cache (for measuring what it saves).

Every output equals `export.generate` (greedy_decode / beam_search) token for token; as there,
padding and the start token are never generated, and by default each sentence gets its own
length limit, from its own length, so its output never depends on its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from service.decoding import (
    Hypothesis,
    SearchOptions,
    SearchState,
    advance_rows,
    default_max_output_tokens,
    start_search,
)
from service.engine.graphs import ModelDims, OnnxGraphs, encode_sources, pad_ids
from service.modeldir.tokenizer import Tokenizer, translate_in_batches

__all__ = [  # the decoding entry points, and the pieces of the loop for decoders built on it
    "CachedSteps",
    "Hypothesis",
    "Prefixes",
    "StepSource",
    "default_max_output_tokens",
    "pad_ids",
    "run_search",
    "start_states",
    "translate_ids",
    "translate_ids_staggered",
    "translate_ids_without_cache",
]


def translate_ids(
    graphs: OnnxGraphs,
    sources: Sequence[Sequence[int]],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_output_tokens: int | None = None,
    n_best: int = 1,
    forced_starts: Sequence[Sequence[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch of source ids with the KV-cached decoder-step graph.

    Args:
        graphs: the model's graphs.
        sources: token ids per sentence, each ending with the end token.
        beam_size: K; 1 is greedy.
        length_penalty: α in score / length^α (beam search).
        max_output_tokens: decoder steps at most, the end token included; default per sentence
            `default_max_output_tokens(len(source), max_positions)`.
        n_best: hypotheses per sentence (at most beam_size).
        forced_starts: per sentence, tokens imposed first with log-prob 0 (a multilingual model's
            target-language token); None: none.
    Returns:
        Per sentence, its `n_best` hypotheses, best first.
    Raises:
        ValueError: a source that is empty, does not end with the end token, or is too long; a
            limit over the model's max_positions; n_best or beam_size out of range.
    """
    states = start_states(
        graphs.dims, sources, beam_size, length_penalty, max_output_tokens, n_best, forced_starts
    )
    if not states:
        return []
    return run_search(states, CachedSteps(graphs, sources), graphs.dims.bos_id)


def translate_ids_without_cache(
    graphs: OnnxGraphs,
    sources: Sequence[Sequence[int]],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_output_tokens: int | None = None,
    n_best: int = 1,
    method: Literal["replay", "attention"] = "replay",
) -> list[list[Hypothesis]]:
    """`translate_ids` recomputing the whole prefix at every step: the baseline the cache beats.

    Args:
        method: "replay" feeds the decoder-step graph the whole prefix token by token from an
            empty cache at every step (encoder once); "attention" runs the teacher-forced
            attention graph over the prefix (one call per step, the encoder included).
        The others as in `translate_ids`.
    """
    states = start_states(graphs.dims, sources, beam_size, length_penalty, max_output_tokens, n_best)
    if not states:
        return []
    steps: StepSource
    steps = _ReplaySteps(graphs, sources) if method == "replay" else _AttentionSteps(graphs, sources)
    return run_search(states, steps, graphs.dims.bos_id)


def translate_ids_staggered(
    graphs: OnnxGraphs,
    sources: Sequence[Sequence[int]],
    arrivals: Sequence[int],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_output_tokens: int | None = None,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """`translate_ids` with sentence i joining the running batch at decoder step `arrivals[i]`.

    What a continuous-batching scheduler does, in its plainest form: a newcomer is encoded alone
    and its row joins the running batch's cache, each row has its own positions and slots (masked
    beyond its length), finished rows leave at once. Every output must equal the sentence decoded
    alone.
    """
    if len(arrivals) != len(sources):
        raise ValueError(f"{len(arrivals)} arrival steps for {len(sources)} sources")
    dims = graphs.dims
    states = start_states(dims, sources, beam_size, length_penalty, max_output_tokens, n_best)
    sentences = np.zeros(0, dtype=np.int64)  # (R,) the sentence of each row
    tokens = np.zeros(0, dtype=np.int64)  # (R,) each row's newest token
    cache = graphs.new_cache()
    tick, last_arrival = 0, max(arrivals, default=-1)
    while tick <= last_arrival or len(sentences):
        for i in (i for i, t in enumerate(arrivals) if t == tick and not states[i].done):
            cache.append(encode_sources(graphs, [sources[i]]))
            sentences, tokens = np.r_[sentences, i], np.r_[tokens, dims.bos_id]
        tick += 1
        if not len(sentences):
            continue
        log_probs = graphs.step_cache(tokens, cache)
        rows, tokens = _advance(states, sentences, log_probs)
        sentences = sentences[rows]
        cache.keep(rows)
    return [s.hypotheses() for s in states]


def translate_texts(
    model: OnnxGraphs | Path | str,
    tokenizer: Tokenizer | None,
    texts: Sequence[str],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 64,
) -> list[str]:
    """Translate texts in batches of similar length; the output keeps the input order.

    Args:
        model: the graphs, or a model directory to load them from.
        tokenizer: the model's tokenizer; None loads the one its manifest names.
    Returns:
        The best translation of each text; "" for an empty (or blank) text, without decoding it.
    Raises:
        InputTooLongError: a text needs more tokens than the model's max_positions.
    """
    graphs = model if isinstance(model, OnnxGraphs) else OnnxGraphs(model)
    if tokenizer is None:
        tokenizer = Tokenizer.from_file(graphs.model_dir / graphs.manifest.tokenizer)

    def decode_batch(sources: list[list[int]]) -> list[list[int]]:
        hyps = translate_ids(graphs, sources, beam_size=beam_size, length_penalty=length_penalty)
        return [list(h[0].tokens) for h in hyps]

    return translate_in_batches(tokenizer, texts, graphs.dims.max_positions, decode_batch, batch_size)


# --- the search loop -----------------------------------------------------------------------------


class StepSource(Protocol):
    """Where a step's log-probabilities come from: with a cache, or recomputed."""

    def run(self, sentences: np.ndarray, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        """Log-probabilities (R, V) of the token after each row's prefix.

        Args:
            sentences: (R,) the sentence of each row.
            parents: (R,) the row of the previous step each row continues; None at the first step.
            tokens: (R,) the token each row appends to its parent's prefix (the start token first).
        """
        ...


def start_states(
    dims: ModelDims,
    sources: Sequence[Sequence[int]],
    beam_size: int,
    length_penalty: float,
    max_output_tokens: int | None,
    n_best: int,
    forced_starts: Sequence[Sequence[int]] | None = None,
) -> list[SearchState]:
    if max_output_tokens is not None and max_output_tokens > dims.max_positions:
        raise ValueError(
            f"max_output_tokens {max_output_tokens} is over the model's max_positions {dims.max_positions}"
        )
    states = []
    for i, source in enumerate(sources):
        if not source or source[-1] != dims.eos_id:
            raise ValueError(f"source {i} does not end with the end token {dims.eos_id}")
        if len(source) > dims.max_positions:
            raise ValueError(
                f"source {i} has {len(source)} tokens, over the model's max_positions {dims.max_positions}"
            )
        limit = max_output_tokens
        if limit is None:
            limit = default_max_output_tokens(len(source), dims.max_positions)
        options = SearchOptions(
            limit,
            dims.eos_id,
            beam_size,
            length_penalty,
            n_best,
            never_ids=dims.never_ids,
            forced_start=tuple(forced_starts[i]) if forced_starts is not None else (),
            forced_eos_at_limit=dims.forced_eos_at_limit,
        )
        states.append(start_search(options))
    return states


def run_search(states: list[SearchState], steps: StepSource, bos_id: int) -> list[list[Hypothesis]]:
    """Advance every sentence until all are done; rows are the live beams, sentence by sentence."""
    sentences = np.array([i for i, s in enumerate(states) for _ in s.live], dtype=np.int64)  # (R,)
    tokens = np.full(len(sentences), bos_id, dtype=np.int64)
    parents: np.ndarray | None = None
    while len(sentences):
        log_probs = steps.run(sentences, parents, tokens)  # (R, V)
        parents, tokens = _advance(states, sentences, log_probs)
        sentences = sentences[parents]
    return [s.hypotheses() for s in states]


def _advance(
    states: list[SearchState], sentences: np.ndarray, log_probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`advance_rows` for the sentences of a step's rows (updating `states`): the parent row and
    next token of each new row."""
    order = _unique_in_order(sentences)
    moved = advance_rows([states[i] for i in order], log_probs)
    for i, state in zip(order, moved.states, strict=True):
        states[i] = state
    return moved.parents, moved.tokens


def _unique_in_order(sentences: np.ndarray) -> list[int]:
    """Sentence ids in row order, once each (rows of a sentence are contiguous)."""
    return list(dict.fromkeys(sentences.tolist()))  # a few rows: cheaper than numpy's calls


# --- log-probabilities with and without a cache --------------------------------------------------


class CachedSteps:
    """Encoder once; each step feeds the newest tokens and keeps the self-attention cache."""

    def __init__(self, graphs: OnnxGraphs, sources: Sequence[Sequence[int]]) -> None:
        self.graphs = graphs
        self.source = encode_sources(graphs, sources)
        self.cache = graphs.new_cache()

    def run(self, sentences: np.ndarray, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        if parents is None:
            self.cache = self.graphs.new_cache()
            self.cache.append(self.source.take(sentences))
        else:
            self.cache.keep(parents)
        return self.graphs.step_cache(tokens, self.cache)


class Prefixes:
    """The whole prefix of every row (start token included), for the recomputing baselines."""

    def __init__(self) -> None:
        self.ids = np.zeros((0, 0), dtype=np.int64)  # (R, t)

    def grow(self, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        previous = np.zeros((len(tokens), 0), dtype=np.int64) if parents is None else self.ids[parents]
        self.ids = np.concatenate([previous, tokens[:, None]], axis=1)
        return self.ids


class _ReplaySteps:
    """Encoder once; every step replays the whole prefix through the decoder-step graph from an
    empty cache (the cache lives only within one replay)."""

    def __init__(self, graphs: OnnxGraphs, sources: Sequence[Sequence[int]]) -> None:
        self.graphs = graphs
        self.source = encode_sources(graphs, sources)
        self.prefixes = Prefixes()

    def run(self, sentences: np.ndarray, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        prefixes = self.prefixes.grow(parents, tokens)  # (R, t)
        cache = self.graphs.new_cache()
        cache.append(self.source.take(sentences))
        for position in range(prefixes.shape[1]):
            log_probs = self.graphs.step_cache(prefixes[:, position], cache)
        return log_probs


class _AttentionSteps:
    """Every step runs the teacher-forced attention graph (encoder included) over the whole prefix."""

    def __init__(self, graphs: OnnxGraphs, sources: Sequence[Sequence[int]]) -> None:
        self.graphs = graphs
        self.src_ids, self.src_mask = pad_ids(sources, graphs.dims.pad_id)
        self.prefixes = Prefixes()

    def run(self, sentences: np.ndarray, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        prefixes = self.prefixes.grow(parents, tokens)  # (R, t)
        out = self.graphs.attention(
            self.src_ids[sentences], self.src_mask[sentences], prefixes, prefixes != self.graphs.dims.pad_id
        )
        return np.asarray(out.log_probs[:, -1])  # (R, V)
