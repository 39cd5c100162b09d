"""Attend requests → the sentence pairs to attend and the maps to return, checked.

A map spans one source–target pair, and the model was trained on sentences: a source of several
sentences (split as Translate splits a text, `service.rpc.sentences`) is attended sentence by
sentence, each with its own target sentence, and reported per sentence. A given target is split
by the target language's rules and must have as many sentences; no target: the server translates
each source sentence (the servicer, with `translate_jobs`). `no_sentence_split` attends to the
source and the target whole, as one pair. Every failure is an `InvalidRequestError` naming the
field and the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from service.api.translator.v1 import translator_pb2 as pb
from service.modeldir.manifest import Languages, ModelShape
from service.modeldir.tokenizer import Tokenizer
from service.rpc.requests import (
    InvalidRequestError,
    RequestLimits,
    check_sentence_count,
    check_source_sizes,
    encode_sentence,
    request_languages,
    sentence_name,
)
from service.rpc.sentences import Split, split_sentences, whole
from service.rpc.sizes import texts_overrun

Kind: TypeAlias = pb.AttentionKind.ValueType  # an AttentionKind value
ATTENTION_KINDS: tuple[Kind, ...] = (
    pb.ATTENTION_KIND_CROSS,
    pb.ATTENTION_KIND_ENCODER_SELF,
    pb.ATTENTION_KIND_DECODER_SELF,
)


@dataclass(frozen=True)
class AttendPairs:
    """The sentence pairs of an Attend request: sources always, targets when the request gave one."""

    source: Split
    source_ids: tuple[tuple[int, ...], ...]  # one per source sentence, the end token last
    target: Split | None  # None: the server translates each source sentence
    target_ids: tuple[tuple[int, ...], ...]  # one per target sentence, no end token; () without a target


def attend_pairs(
    request: pb.AttendRequest, tokenizer: Tokenizer, limits: RequestLimits, languages: Languages
) -> AttendPairs:
    """The source's sentences (and the target's, paired in order), tokenised and within the limits.

    Raises:
        InvalidRequestError: an empty source, too many sentences, a sentence over the model's
            limits, or a target whose sentences do not pair with the source's.
    """
    check_attend_sizes(request, tokenizer, limits)
    source_language, start = request_languages(
        request.source_language, request.target_language, tokenizer, limits
    )
    split = (
        whole(request.source)
        if request.no_sentence_split
        else split_sentences(request.source, request.source_language or languages.source)
    )
    count = len(split.sentences)
    check_sentence_count(count, limits)
    source_ids = tuple(
        tuple(encode_sentence(tokenizer, s, limits, sentence_name("source", j, count), source_language))
        for j, s in enumerate(split.sentences)
    )
    if not request.HasField("target"):
        return AttendPairs(split, source_ids, None, ())
    _check_target_size(request.target, count, count == 1, tokenizer, limits)
    target_language = request.target_language or languages.target
    target = whole(request.target) if count == 1 else split_sentences(request.target, target_language)
    if len(target.sentences) != count:
        raise InvalidRequestError(
            f"target has {len(target.sentences)} sentences and source {count}: a source of several "
            "sentences is attended sentence by sentence, so give one target sentence for each (or set "
            "no_sentence_split to attend to them whole)"
        )
    target_ids = []
    limit = limits.effective_max_output_tokens  # what GetModelInfo reports, though a given target
    for j, sentence in enumerate(target.sentences):  # takes no KV-cache slot
        # a multilingual model's target-language token is each target's first token
        where = sentence_name("target", j, count)
        _check_target_size(sentence, 1, True, tokenizer, limits, extra=len(start), name=where)
        ids = (*start, *tokenizer.encode_target(sentence))
        if len(ids) + 1 > limit:
            raise InvalidRequestError(
                f"{where} is {len(ids) + 1} tokens (end token included), longer than the limit of {limit}"
            )
        target_ids.append(ids)
    return AttendPairs(split, source_ids, target, tuple(target_ids))


def check_attend_sizes(request: pb.AttendRequest, tokenizer: Tokenizer, limits: RequestLimits) -> None:
    """The checks of `attend_pairs` that take no splitting or tokenising: a source that is not
    empty, and the source and the target against the limits from their lengths alone (see
    `requests.check_sizes`)."""
    if not request.source.strip():
        raise InvalidRequestError("source is empty")
    check_source_sizes([request.source], ["source"], request.no_sentence_split, tokenizer, limits)
    if request.HasField("target"):
        most = limits.max_sentences_per_request  # one target sentence per source sentence
        _check_target_size(request.target, most, request.no_sentence_split, tokenizer, limits)


def _check_target_size(
    target: str,
    sentences: int,
    no_split: bool,
    tokenizer: Tokenizer,
    limits: RequestLimits,
    *,
    extra: int = 0,
    name: str = "target",
) -> None:
    """A target (`name`) of `sentences` sentences (one, whole, when `no_split`; `extra`: forced
    tokens before it) against the target limit, from its length alone."""
    limit = limits.effective_max_output_tokens
    if no_split:
        least = extra + tokenizer.least_tokens(target) + 1
        if least > limit:
            raise InvalidRequestError(
                f"{name} is {len(target):,} characters, at least {least:,} tokens (end token included), "
                f"longer than the limit of {limit}"
            )
        return
    room = sentences * (limit - 1)
    why = texts_overrun([target], tokenizer, room)
    if why is not None:
        raise InvalidRequestError(
            f"target: {why}, more than the {room:,} a target of at most {sentences} sentences may hold "
            f"(one per source sentence, each at most {limit} tokens, end token included)"
        )


def attend_selection(request: pb.AttendRequest, shape: ModelShape) -> tuple[list[Kind], list[int], list[int]]:
    """(kinds, layers, heads) of an Attend request, checked against the model's shape.

    No kinds means cross-attention alone; layers and heads come back sorted and without repeats
    (no layers: every layer; no heads: the head mean alone).
    Raises:
        InvalidRequestError: an unknown or repeated kind, a layer or head the model does not have.
    """
    kinds = list(request.kinds) or [pb.ATTENTION_KIND_CROSS]
    for kind in kinds:
        if kind not in ATTENTION_KINDS:
            raise InvalidRequestError(
                f"kinds: {kind} is not an attention kind (CROSS, ENCODER_SELF, DECODER_SELF)"
            )
    if len(set(kinds)) != len(kinds):
        raise InvalidRequestError("kinds: each attention kind may be requested at most once")
    layers = sorted(set(request.layers))
    for kind in kinds:
        limit = shape.encoder_layers if kind == pb.ATTENTION_KIND_ENCODER_SELF else shape.decoder_layers
        if layers and layers[-1] >= limit:
            raise InvalidRequestError(
                f"layers: {layers[-1]} is out of range; {pb.AttentionKind.Name(kind)} has {limit} "
                f"layers (0 to {limit - 1})"
            )
    heads = sorted(set(request.heads))
    if heads and heads[-1] >= shape.heads:
        raise InvalidRequestError(f"heads: {heads[-1]} is out of range; the model has {shape.heads} heads")
    return kinds, layers, heads
