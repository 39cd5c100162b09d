"""API requests → validated decoding jobs: every bad input becomes one clear message.

The servicer calls `translate_jobs` (Translate, TranslateStream; Attend's checks are in
`service.rpc.attend`) before anything is queued; an `InvalidRequestError` becomes INVALID_ARGUMENT
with its message, which says what was wrong and what the limit is. Each text is split into sentences here
(`service.rpc.sentences`), and each sentence becomes one decoding job: the model's limits hold
per sentence, and the number of sentences is bounded per request. Resolving the model name
(NOT_FOUND) is the engine's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from service.api.translator.v1 import translator_pb2 as pb
from service.decoding import Sampling, SearchOptions, default_max_output_tokens
from service.modeldir.manifest import Decoding, Languages
from service.modeldir.tokenizer import InputTooLongError, Tokenizer
from service.rpc.sentences import Split, split_sentences, whole
from service.rpc.sizes import texts_overrun

DEFAULT_BEAM_SIZE = 4
LENGTH_PENALTY_RANGE = (0.0, 2.0)
TEMPERATURE_RANGE = (0.01, 10.0)
TOP_P_RANGE = (0.0, 1.0)

M = TypeVar("M", bound=Message)


class InvalidRequestError(ValueError):
    """The request cannot be served as sent (→ INVALID_ARGUMENT, with this message)."""


# --- bytes → request message -------------------------------------------------------------------------


@dataclass(frozen=True)
class UndecodableRequest:
    """Request bytes that are not a valid message of the method's type (a corrupt wire format, a
    string field that is not UTF-8), handed to the servicer method in place of the message so that
    the refusal goes through its `_handled` like any call: INVALID_ARGUMENT, counted, logged. A
    deserializer that raised would end the call in gRPC itself: UNKNOWN, a traceback in the log,
    and no count or log line."""

    message_type: str  # e.g. "translator.v1.TranslateRequest"
    reason: str  # what the protobuf parser said


def request_decoder(message_class: type[M]) -> Callable[[bytes], M | UndecodableRequest]:
    """The request deserializer of a method taking `message_class` (server.py registers it)."""
    name = message_class.DESCRIPTOR.full_name
    # protobuf's message already names the type: keep only what comes after it
    said = f"Error parsing message with type '{name}': "

    def decode(data: bytes) -> M | UndecodableRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as err:
            return UndecodableRequest(name, str(err).removeprefix(said) or "it does not parse")

    return decode


def decoded(request: M | UndecodableRequest) -> M:
    """The request message; raises InvalidRequestError for bytes that did not decode."""
    if isinstance(request, UndecodableRequest):
        raise InvalidRequestError(f"the request is not a valid {request.message_type}: {request.reason}")
    return request


# --- limits ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerShare:
    """What one scheduler instance holds (service/scheduler/pool.py): its share of the server's
    --max-sequences and --max-kv-cache-tokens, and the queue of the process. A request decodes on
    one instance and must fit it empty, and every sentence of a call waits in the queue before it
    decodes, so these bound a request as surely as the model's limits do. A request beyond them is
    refused here, before anything is queued, with a message that says what to ask for instead; and
    GetModelInfo reports them."""

    max_sequences: int  # decoder rows; a beam of K is K rows
    max_kv_cache_tokens: int  # self-attention cache slots: a request holds beam × max_output_tokens
    queue_capacity: int  # requests that can wait at once (one per sentence)
    split: str = ""  # who splits the server's limits ("2 instances split (--instances)"); "": none
    queue_setting: str = "--max-queue-size"  # where queue_capacity comes from, for messages

    def names(self, flag: str) -> str:
        """The setting a limit comes from, as a message names it."""
        if not self.split:
            return flag
        return f"one scheduler instance's share of {flag}, which {self.split}"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for: the server's limits and the model's."""

    max_texts_per_request: int  # --max-texts-per-request
    max_sentences_per_request: int  # --max-sentences-per-request, over all the texts of a call
    max_beam_size: int  # --max-beam-size
    max_source_tokens: int  # the end token included
    max_output_tokens: int  # the model's; the end token included
    vocab_size: int
    scheduler: SchedulerShare | None = None  # None: no scheduler bounds (the model's limits alone)
    languages: Languages | None = None  # a bilingual model's pair, a multilingual one's default source
    # An imported checkpoint's decoding record (banned tokens, forced end token, default beams and
    # length limit); None: this project's conventions (pad and start never generated, greedy).
    decoding: Decoding | None = None

    # What a request can actually get, the tighter of the settings and the scheduler's share: what
    # GetModelInfo reports, so that a client that keeps within it is never refused for its size.

    @property
    def effective_max_texts(self) -> int:
        return min(self.max_texts_per_request, self.effective_max_sentences)

    @property
    def effective_max_sentences(self) -> int:
        """Every sentence waits in the queue as one request."""
        share = self.scheduler
        return (
            self.max_sentences_per_request
            if share is None
            else min(self.max_sentences_per_request, share.queue_capacity)
        )

    @property
    def effective_max_beam_size(self) -> int:
        share = self.scheduler
        return self.max_beam_size if share is None else min(self.max_beam_size, share.max_sequences)

    @property
    def default_beam_size(self) -> int:
        """Beams for a request that names no strategy (and does not stream)."""
        return 1 if self.decoding is None else self.decoding.default_beam_size

    @property
    def default_output_cap(self) -> int:
        """The most a request that sets no max_output_tokens gets per sentence (before its length
        rule): effective_max_output_tokens, or the model's own default limit when lower."""
        cap = None if self.decoding is None else self.decoding.max_output_tokens
        return self.effective_max_output_tokens if cap is None else min(cap, self.effective_max_output_tokens)

    @property
    def effective_max_output_tokens(self) -> int:
        """The most a greedy request can get (one row: one KV-cache slot per token); a beam of K
        reserves K slots per token, so it gets at most max_kv_cache_tokens // K."""
        share = self.scheduler
        return (
            self.max_output_tokens
            if share is None
            else min(self.max_output_tokens, share.max_kv_cache_tokens)
        )


@dataclass(frozen=True)
class SentenceJob:
    """One sentence, tokenised and with its decoding options: one scheduler Request."""

    source_ids: tuple[int, ...]  # ends with the end token
    options: SearchOptions  # the text's; the forced prefix only on its first sentence


@dataclass(frozen=True)
class TextJob:
    """One text: its sentences ready for the scheduler, and the spacing to join their translations."""

    text: str
    split: Split
    sentences: tuple[SentenceJob, ...]  # one per split.sentences
    seed: int | None  # the sampling seed of every sentence (reported back), None when not sampling


def translate_jobs(
    texts: Sequence[str],
    options: pb.TranslateOptions,
    tokenizer: Tokenizer,
    limits: RequestLimits,
    *,
    language: str,
    streaming: bool = False,
    new_seed: Callable[[], int],
) -> list[TextJob]:
    """Validate a Translate / TranslateStream request and build one job per text, one sentence job
    per sentence (the whole text one with options.no_sentence_split).

    Args:
        language: the model's source language, whose rules split the texts.
        new_seed: a fresh seed, for sampling requests that did not send one.
    Raises:
        InvalidRequestError: naming the field, the value and the limit.
    """
    check_sizes(texts, options, tokenizer, limits)
    splits = [whole(t) if options.no_sentence_split else split_sentences(t, language) for t in texts]
    check_sentence_count(sum(len(s.sentences) for s in splits), limits)
    beam_size, length_penalty = _beam(options, limits, streaming)
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
    prefix = tuple(tokenizer.encode_target(options.target_prefix)) if options.target_prefix else ()
    source_language, start = request_languages(
        options.source_language, options.target_language, tokenizer, limits
    )
    requested_max = options.stopping.max_output_tokens
    if requested_max > limits.max_output_tokens:
        raise InvalidRequestError(
            f"max_output_tokens {requested_max} is over the model's limit of {limits.max_output_tokens}"
        )
    sp = tokenizer.special
    jobs = []
    for i, (text, split) in enumerate(zip(texts, splits, strict=True)):
        seed = None
        if sampling is not None:
            seed = options.sampling.seed if options.sampling.HasField("seed") else new_seed()
            sampling = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, seed)
        sentences = []
        for j, sentence in enumerate(split.sentences):
            where = sentence_name(f"text {i}", j, len(split.sentences))
            source = encode_sentence(tokenizer, sentence, limits, where, source_language)
            forced = prefix if j == 0 else ()  # a target prefix starts the text; a language, each sentence
            max_out = requested_max or default_max_output_tokens(len(source), limits.default_output_cap)
            unit = "text" if len(split.sentences) == 1 else "sentence"
            imposed = len(start) + len(forced)
            _check_room(where, unit, max_out, len(source), imposed, options.stopping, beam_size, limits)
            try:
                search = SearchOptions(
                    max_output_tokens=max_out,
                    eos_id=sp.eos,
                    beam_size=beam_size,
                    length_penalty=length_penalty,
                    n_best=n_best,
                    never_ids=(sp.pad, sp.bos) if limits.decoding is None else limits.decoding.never_ids,
                    min_output_tokens=options.stopping.min_output_tokens,
                    forced_start=start,
                    forced_prefix=forced,
                    forced_eos_at_limit=limits.decoding is not None and limits.decoding.forced_eos_at_limit,
                    sampling=sampling,
                )
            except ValueError as err:  # what _check_room does not foresee
                raise InvalidRequestError(f"{where}: {err}") from err
            sentences.append(SentenceJob(tuple(source), search))
        jobs.append(TextJob(text, split, tuple(sentences), seed))
    return jobs


def check_sizes(
    texts: Sequence[str], options: pb.TranslateOptions, tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    """The checks of `translate_jobs` that take no splitting or tokenising: the number of texts,
    none empty, and the texts and the target prefix against the model's limits from their lengths
    alone (service.rpc.sizes) — milliseconds for any size, so that the servicer can refuse a request
    at once and send only one that might fit to be split and tokenised.

    Raises:
        InvalidRequestError: naming the text, its length, the tokens it needs at least and the limit.
    """
    _check_text_count(len(texts), limits)
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequestError(f"text {i} is empty")
    check_source_sizes(
        texts, [f"text {i}" for i in range(len(texts))], options.no_sentence_split, tokenizer, limits
    )
    least = tokenizer.least_tokens(options.target_prefix)
    if least >= limits.max_output_tokens:  # it would leave no room (_check_room)
        raise InvalidRequestError(
            f"target_prefix is {len(options.target_prefix):,} characters, at least {least:,} tokens, and "
            f"an output is at most {limits.max_output_tokens} tokens (the model's limit, end token "
            "included): the prefix must be shorter"
        )


def check_source_sizes(
    texts: Sequence[str], names: Sequence[str], whole_texts: bool, tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    """Texts (`names`: how messages call them) against the source limits, from their lengths alone:
    each a sentence (`whole_texts`), or all of them split into at most --max-sentences-per-request
    sentences of at most max_source_tokens tokens each."""
    if whole_texts:
        for name, text in zip(names, texts, strict=True):
            try:
                tokenizer.check_length(text, limits.max_source_tokens)
            except InputTooLongError as err:
                raise InvalidRequestError(f"{name}: {err}") from err
        return
    per_sentence = limits.max_source_tokens - 1  # a sentence's end token aside
    room = limits.max_sentences_per_request * per_sentence
    why = texts_overrun(texts, tokenizer, room)
    if why is not None:
        named = names[0] if len(names) == 1 else f"the {len(names)} texts"
        raise InvalidRequestError(
            f"{named}: {why}, more than the {room:,} one request may hold: at most "
            f"{limits.max_sentences_per_request} sentences (--max-sentences-per-request) of "
            f"{per_sentence} tokens each (the model's limit of {limits.max_source_tokens}, end token "
            "included); send less text per call"
        )


_SHOWN_CODES = 12  # language codes a message lists at most (NLLB has 202; GetModelInfo lists all)
_SHOWN_CHARS = 40  # of a code echoed back: a message must not carry whatever a client sent


def request_languages(
    source: str, target: str, tokenizer: Tokenizer, limits: RequestLimits
) -> tuple[str | None, tuple[int, ...]]:
    """The source language the tokenizer marks the source with (None: none) and the forced start
    of the output (a multilingual model's target-language token), for a request's language fields.

    Raises:
        InvalidRequestError: a multilingual model without target_language, a code the model lacks,
            or a bilingual model asked for another pair.
    """
    pair = limits.languages
    codes = tokenizer.languages
    if not codes:
        if pair is not None and (source not in ("", pair.source) or target not in ("", pair.target)):
            asked = f"{_echoed(source) or pair.source} → {_echoed(target) or pair.target}"
            raise InvalidRequestError(f"the model translates {pair.source} → {pair.target} only, not {asked}")
        return None, ()
    if not target:
        raise InvalidRequestError(f"target_language is required by this multilingual model: {_codes(codes)}")
    for field, code in (("source_language", source), ("target_language", target)):
        if code and code not in codes:
            raise InvalidRequestError(
                f"{field} {_echoed(code)!r} is not one of the model's languages: {_codes(codes)}"
            )
    source = source or (pair.source if pair is not None else "")
    return (source if source in codes else None), (codes[target],)


def _echoed(code: str) -> str:
    return code if len(code) <= _SHOWN_CHARS else code[:_SHOWN_CHARS] + "…"


def _codes(codes: Mapping[str, int]) -> str:
    names = list(codes)
    listed = ", ".join(names[:_SHOWN_CODES])
    more = (
        f" and {len(names) - _SHOWN_CODES} more (GetModelInfo lists them)"
        if len(names) > _SHOWN_CODES
        else ""
    )
    return listed + more


def sentence_name(text: str, j: int, count: int) -> str:
    """How a message names sentence j of the `count` in `text` ("text 2", "source"): the text alone
    when it is one sentence."""
    return text if count == 1 else f"{text}, sentence {j + 1} of {count}"


def encode_sentence(
    tokenizer: Tokenizer, sentence: str, limits: RequestLimits, where: str, language: str | None = None
) -> list[int]:
    """The source ids of one sentence (end token included; a multilingual model's source-language
    token first), within the model's limit."""
    try:
        return tokenizer.encode_source(sentence, limits.max_source_tokens, language)
    except InputTooLongError as err:
        raise InvalidRequestError(f"{where}: {err}") from err


def _check_text_count(count: int, limits: RequestLimits) -> None:
    if not count:
        raise InvalidRequestError(f"no texts: send between 1 and {limits.effective_max_texts}")
    _check_count(count, "text", limits.max_texts_per_request, "--max-texts-per-request", limits)


def check_sentence_count(count: int, limits: RequestLimits) -> None:
    """Bounds the sentences of a call, which are its requests to the scheduler: checked before any
    is tokenised, so that one huge paragraph costs no more than its split."""
    flag = "--max-sentences-per-request"
    fix = "; send the texts over several calls"
    _check_count(count, "sentence", limits.max_sentences_per_request, flag, limits, fix)


def _check_count(count: int, unit: str, limit: int, flag: str, limits: RequestLimits, fix: str = "") -> None:
    """`count` texts or sentences (`unit`) of one call against their setting and the queue."""
    if count > limit:
        raise InvalidRequestError(
            f"{count} {unit}s in one request, more than the limit of {limit} ({flag}){fix}"
        )
    share = limits.scheduler
    if share is not None and count > share.queue_capacity:
        # Not "queue full, retry later" (RESOURCE_EXHAUSTED): each one waits in the queue before it
        # decodes, so such a call is refused on an idle server too, however often it is retried.
        raise InvalidRequestError(
            f"{count} {unit}s in one request, more than the {share.queue_capacity} the server's request "
            f"queue holds ({share.queue_setting}): every {unit} waits in the queue, so the call could "
            f"never be accepted; send at most {share.queue_capacity} {unit}s per call"
        )


def _check_room(
    name: str,
    unit: str,
    max_out: int,
    source_len: int,
    prefix_len: int,
    stopping: pb.StoppingCriteria,
    beam_size: int,
    limits: RequestLimits,
) -> None:
    """A sentence's max_output_tokens (sent, or the default for its length) against the forced
    prefix, the minimum and the KV cache. When the client never set it, the message says where the
    number comes from and which sentence (`name`; `unit`: "text" or "sentence", what it is); when
    it did, the fault is the whole request's, not one sentence's."""
    limit = limits.effective_max_output_tokens
    if stopping.max_output_tokens:
        where, named = "", f"max_output_tokens {max_out}"
    else:
        where = f"{name}: "
        named = (
            f"max_output_tokens {max_out} (not set: the default for this {unit}'s {source_len} source "
            f"tokens, 2 × {source_len} + 10, at most {limits.default_output_cap})"
        )
    if prefix_len >= max_out:
        problem = f"target_prefix is {prefix_len} tokens and {named} leaves no room after it"
        need, what = prefix_len + 1, "target_prefix must be shorter"
    elif stopping.min_output_tokens >= max_out:
        problem = f"min_output_tokens {stopping.min_output_tokens} must be below {named}"
        need, what = stopping.min_output_tokens + 1, "min_output_tokens must be lower"
    else:
        need = 0
    if need:
        fix = (
            f"set stopping.max_output_tokens between {need} and {limit} (the most that may be asked for)"
            if need <= limit
            else f"max_output_tokens may be at most {limit} (the end token included), so {what}"
        )
        raise InvalidRequestError(f"{where}{problem}; {fix}")
    share = limits.scheduler
    if share is not None and beam_size * max_out > share.max_kv_cache_tokens:
        raise InvalidRequestError(where + _kv_overrun(named, max_out, beam_size, share))


def _kv_overrun(named: str, max_out: int, beam_size: int, share: SchedulerShare) -> str:
    """Why beam_size × max_output_tokens cannot fit the KV cache, and what does."""
    budget, flag = share.max_kv_cache_tokens, share.names("--max-kv-cache-tokens")
    if beam_size == 1:
        return (
            f"{named} needs {max_out} KV-cache slots (one per token), more than the {budget} one "
            f"request may hold ({flag}); set stopping.max_output_tokens to at most {budget}"
        )
    return (
        f"beam_size {beam_size} × {named} needs {beam_size * max_out} KV-cache slots, more than the "
        f"{budget} one request may hold ({flag}); set stopping.max_output_tokens to at most "
        f"{budget // beam_size} for beam_size {beam_size}, or ask for a smaller beam_size"
    )


def _within(value: float, bounds: tuple[float, float]) -> bool:
    """`low <= value <= high`, compared in float32 as the proto fields are: 0.01 arrives as
    0.0099999998 and, held against the double 0.01, would fall below the documented inclusive
    minimum. NaN is never within."""
    low, high = bounds
    return bool(np.float32(low) <= np.float32(value) <= np.float32(high))


def _shown(value: float) -> str:
    """A float field as the client most likely wrote it: the shortest float32 spelling (0.01, not
    the double 0.009999999776)."""
    return f"{float(str(np.float32(value))):g}"


def _beam(options: pb.TranslateOptions, limits: RequestLimits, streaming: bool = False) -> tuple[int, float]:
    """(beam size, length penalty) of the request; greedy and sampling are beam 1. A request that
    names no strategy gets the model's default (an imported checkpoint's num_beams; streams: 1)."""
    strategy = options.WhichOneof("strategy")
    if strategy is None and limits.default_beam_size > 1 and not streaming:
        beam_size, named = (
            limits.default_beam_size,
            f"beam_size {limits.default_beam_size} (the model's default)",
        )
    elif strategy != "beam":
        return 1, 1.0
    else:
        beam_size = options.beam.beam_size or DEFAULT_BEAM_SIZE
        named = f"beam_size {beam_size}" + ("" if options.beam.beam_size else " (not set: the default)")
    beam = options.beam
    if beam_size > limits.max_beam_size:
        raise InvalidRequestError(f"{named} is over the limit of {limits.max_beam_size} (--max-beam-size)")
    share = limits.scheduler
    if share is not None and beam_size > share.max_sequences:
        flag = share.names("--max-sequences")
        raise InvalidRequestError(
            f"{named} is over the limit of {share.max_sequences}: each beam is a decoder row, and a "
            f"request's rows decode together, at most {share.max_sequences} ({flag})"
        )
    length_penalty = beam.length_penalty if beam.HasField("length_penalty") else 1.0
    if not _within(length_penalty, LENGTH_PENALTY_RANGE):
        low, high = LENGTH_PENALTY_RANGE
        raise InvalidRequestError(
            f"length_penalty {_shown(length_penalty)} must be between {low:g} and {high:g} inclusive"
        )
    return beam_size, length_penalty


def _sampling(options: pb.TranslateOptions, limits: RequestLimits) -> Sampling:
    """The sampling parameters (seed filled in per text by the caller)."""
    s = options.sampling
    temperature = s.temperature or 1.0
    if not _within(temperature, TEMPERATURE_RANGE):
        low, high = TEMPERATURE_RANGE
        raise InvalidRequestError(
            f"temperature {_shown(s.temperature)} must be between {low:g} and {high:g} inclusive "
            "(use greedy for 0)"
        )
    if s.top_k > limits.vocab_size:
        raise InvalidRequestError(f"top_k {s.top_k} is over the vocabulary size {limits.vocab_size}")
    if not _within(s.top_p, TOP_P_RANGE):
        raise InvalidRequestError(f"top_p {_shown(s.top_p)} must be in (0, 1] (0: no truncation)")
    return Sampling(temperature=temperature, top_k=s.top_k, top_p=s.top_p or 1.0)
