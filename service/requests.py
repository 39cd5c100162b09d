"""API requests → validated decoding jobs: every bad input becomes one clear message.

The servicer calls `translate_jobs` before anything is queued; an `InvalidRequestError` becomes
INVALID_ARGUMENT with its message, which says what was wrong and what the limit is. Resolving
the model name (NOT_FOUND) is the engine's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.api.translator.v1 import translator_pb2 as pb
from service.decoding import Sampling, SearchOptions
from service.reference_decoder import default_max_output_tokens
from service.tokenizer import InputTooLongError, Tokenizer

DEFAULT_BEAM_SIZE = 4
LENGTH_PENALTY_RANGE = (0.0, 2.0)
TEMPERATURE_RANGE = (0.01, 10.0)


class InvalidRequestError(ValueError):
    """The request cannot be served as sent (→ INVALID_ARGUMENT, with this message)."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for: the server's limits and the model's."""

    max_texts_per_request: int
    max_beam_size: int
    max_source_tokens: int  # the end token included
    max_output_tokens: int  # the end token included
    vocab_size: int


@dataclass(frozen=True)
class TextJob:
    """One text, tokenised and with its decoding options, ready for the scheduler."""

    text: str
    source_ids: tuple[int, ...]  # ends with the end token
    options: SearchOptions
    seed: int | None  # the sampling seed in use (reported back), None when not sampling


def translate_jobs(
    texts: Sequence[str],
    options: pb.TranslateOptions,
    tokenizer: Tokenizer,
    limits: RequestLimits,
    *,
    streaming: bool = False,
    new_seed: Callable[[], int],
) -> list[TextJob]:
    """Validate a Translate / TranslateStream request and build one job per text.

    Args:
        new_seed: a fresh seed, for sampling requests that did not send one.
    Raises:
        InvalidRequestError: naming the field, the value and the limit.
    """
    if not texts:
        raise InvalidRequestError(f"no texts: send between 1 and {limits.max_texts_per_request}")
    if len(texts) > limits.max_texts_per_request:
        raise InvalidRequestError(
            f"{len(texts)} texts in one request, more than the limit of {limits.max_texts_per_request}"
        )
    beam_size, length_penalty = _beam(options, limits)
    sampling = _sampling(options, limits) if options.WhichOneof("strategy") == "sampling" else None
    n_best = options.n_best or 1
    if n_best > beam_size:
        raise InvalidRequestError(
            f"n_best {n_best} is more than the beam size {beam_size} (n_best > 1 needs beam search)"
        )
    if streaming and (beam_size > 1 or n_best > 1):
        raise InvalidRequestError(
            f"TranslateStream decodes one hypothesis: beam_size {beam_size} and n_best {n_best} must be 1"
        )
    prefix = tuple(tokenizer.encode(options.target_prefix)) if options.target_prefix else ()
    requested_max = options.stopping.max_output_tokens
    if requested_max > limits.max_output_tokens:
        raise InvalidRequestError(
            f"max_output_tokens {requested_max} is over the model's limit of {limits.max_output_tokens}"
        )
    sp = tokenizer.special
    jobs = []
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequestError(f"text {i} is empty")
        try:
            source = tokenizer.encode_source(text, limits.max_source_tokens)
        except InputTooLongError as err:
            raise InvalidRequestError(f"text {i}: {err}") from err
        max_out = requested_max or default_max_output_tokens(len(source), limits.max_output_tokens)
        seed = None
        if sampling is not None:
            seed = options.sampling.seed if options.sampling.HasField("seed") else new_seed()
            sampling = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, seed)
        try:
            search = SearchOptions(
                max_output_tokens=max_out,
                eos_id=sp.eos,
                beam_size=beam_size,
                length_penalty=length_penalty,
                n_best=n_best,
                never_ids=(sp.pad, sp.bos),
                min_output_tokens=options.stopping.min_output_tokens,
                forced_prefix=prefix,
                sampling=sampling,
            )
        except ValueError as err:  # min ≥ max, a prefix with no room left, …
            raise InvalidRequestError(f"text {i}: {err}") from err
        jobs.append(TextJob(text, tuple(source), search, seed))
    return jobs


def _beam(options: pb.TranslateOptions, limits: RequestLimits) -> tuple[int, float]:
    """(beam size, length penalty) of the request; greedy and sampling are beam 1."""
    if options.WhichOneof("strategy") != "beam":
        return 1, 1.0
    beam = options.beam
    beam_size = beam.beam_size or DEFAULT_BEAM_SIZE
    if beam_size > limits.max_beam_size:
        raise InvalidRequestError(f"beam_size {beam_size} is over the limit of {limits.max_beam_size}")
    length_penalty = beam.length_penalty if beam.HasField("length_penalty") else 1.0
    low, high = LENGTH_PENALTY_RANGE
    if not low <= length_penalty <= high:
        raise InvalidRequestError(f"length_penalty {length_penalty:g} must be between {low:g} and {high:g}")
    return beam_size, length_penalty


def _sampling(options: pb.TranslateOptions, limits: RequestLimits) -> Sampling:
    """The sampling parameters (seed filled in per text by the caller)."""
    s = options.sampling
    temperature = s.temperature or 1.0
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise InvalidRequestError(
            f"temperature {s.temperature:g} must be between {low:g} and {high:g} (use greedy for 0)"
        )
    if s.top_k > limits.vocab_size:
        raise InvalidRequestError(f"top_k {s.top_k} is over the vocabulary size {limits.vocab_size}")
    if not 0.0 <= s.top_p <= 1.0:
        raise InvalidRequestError(f"top_p {s.top_p:g} must be in (0, 1] (0: no truncation)")
    return Sampling(temperature=temperature, top_k=s.top_k, top_p=s.top_p or 1.0)
