"""Response messages of `translator.v1` built from decoding results: pure functions, no I/O.

The servicer (`service/rpc/servicer.py`) calls these to turn hypotheses, generations and attention
arrays into proto messages; keeping them apart keeps the servicer to the protocol's flow. A text of
several sentences comes back as one Translation: `translation_message` joins its sentences'
hypotheses with the text's spacing and sums their scores, tokens and timings (the rules are the
proto's, on Translation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message

from service.api.translator.v1 import translator_pb2 as pb
from service.decoding import Hypothesis, normalized_score
from service.engine.graphs import Attention
from service.modeldir.tokenizer import Tokenizer
from service.rpc.attend import Kind
from service.rpc.requests import InvalidRequestError, TextJob
from service.scheduler import FinishReason, Generation, Timings

FINISH_REASONS = {
    FinishReason.END_OF_SEQUENCE: pb.FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
}
REPLACEMENT = "\ufffd"  # what a partial UTF-8 character decodes to: hold the text back
M = TypeVar("M", bound=Message)


class ResponseTooLargeError(InvalidRequestError):
    """A response larger than the server's message limit (--max-message-bytes).

    Sent anyway, gRPC would fail it at the client (RESOURCE_EXHAUSTED, "Sent message larger than
    max") after all the work, while the server counted and logged the call as OK. It is refused
    instead with INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: that code tells clients "the queue is
    full, retry later", and the same request would get the same too-large answer every time; it
    must ask for less (the message says what), or the operator must raise the limit.
    """


def within_message_limit(message: M, limit: int, ask_for: str) -> M:
    """`message`, or ResponseTooLargeError if its serialized size is over `limit` bytes; `ask_for`
    is what a client can ask for instead. Costs a size computation, no serialization."""
    size = message.ByteSize()
    if size > limit:
        raise ResponseTooLargeError(
            f"the {message.DESCRIPTOR.name} would be {size} bytes, over the server's limit of {limit} "
            f"bytes per message (--max-message-bytes): ask for {ask_for}, or for a raised --max-message-bytes"
        )
    return message


def token_messages(h: Hypothesis, tokenizer: Tokenizer, prefix_len: int) -> list[pb.Token]:
    """Every generated token of `h` with its log-probability, the end token last when produced."""
    ids = [*h.tokens, *([tokenizer.special.eos] if h.finished else [])]
    log_probs = h.token_log_probs or (0.0,) * len(ids)
    return [
        pb.Token(
            id=t,
            piece=tokenizer.id_to_token(t),
            logprob=log_prob,
            forced=i < prefix_len,
            special=h.finished and i == len(h.tokens),
        )
        for i, (t, log_prob) in enumerate(zip(ids, log_probs, strict=True))
    ]


def translation_message(
    job: TextJob,
    gens: Sequence[Generation],
    tokenizer: Tokenizer,
    options: pb.TranslateOptions,
    total_s: float,
) -> pb.Translation:
    """The Translation of one text from its job and its sentences' Generations (one each, in order).

    Hypothesis k of the text is hypothesis k of every sentence, joined with the text's spacing, its
    score their sum and its length their total; the text has as many hypotheses as its sentence
    with the fewest.
    """
    if len(gens) != len(job.sentences):
        raise ValueError(f"{len(gens)} generations for {len(job.sentences)} sentences")
    length_penalty = job.sentences[0].options.length_penalty
    prefix_lens = [len(s.options.forced) for s in job.sentences]
    hypotheses = []
    for k in range(min(len(g.hypotheses) for g in gens)):
        hs = [g.hypotheses[k] for g in gens]
        score = sum(float(h.score) for h in hs)
        length = sum(h.length for h in hs)
        hyp = pb.Hypothesis(
            text=job.split.join([tokenizer.decode(list(h.tokens)) for h in hs]),
            score=score,
            normalized_score=normalized_score(score, length, length_penalty),
            finish_reason=_finish_reason(all(h.finished for h in hs)),
        )
        if options.return_tokens:
            for h, prefix_len in zip(hs, prefix_lens, strict=True):
                hyp.tokens.extend(token_messages(h, tokenizer, prefix_len))
        hypotheses.append(hyp)
    cut = any(g.finish_reason == FinishReason.LENGTH for g in gens)
    out = pb.Translation(
        text=hypotheses[0].text,
        finish_reason=FINISH_REASONS[FinishReason.LENGTH if cut else FinishReason.END_OF_SEQUENCE],
        hypotheses=hypotheses,
        input_tokens=sum(g.input_tokens for g in gens),
        output_tokens=sum(g.hypotheses[0].length for g in gens),
    )
    if options.return_timings:
        out.timings.CopyFrom(timings_message([g.timings for g in gens], total_s))
    if job.seed is not None:
        out.seed = job.seed
    return out


def _finish_reason(finished: bool) -> pb.FinishReason.ValueType:
    return pb.FINISH_REASON_END_OF_SEQUENCE if finished else pb.FINISH_REASON_LENGTH


def timings_message(sentences: Sequence[Timings], total_s: float) -> pb.Timings:
    """A text's Timings from its sentences', all submitted at once: queued until the first one was
    admitted, its first token its first sentence's, decoding from there to the last one's end (so
    queue + decode is when the text was ready, as for one sentence)."""
    admitted = min(t.queue_wait_s for t in sentences)
    ended = max(t.queue_wait_s + t.decode_s for t in sentences)
    return pb.Timings(
        queue_seconds=admitted,
        time_to_first_token_seconds=sentences[0].time_to_first_token_s or 0.0,
        decode_seconds=ended - admitted,
        total_seconds=total_s,
    )


def text_delta(tokenizer: Tokenizer, ids: Sequence[int], sent: str) -> str:
    """The text of `ids` beyond what was `sent`, or "" while it ends inside a UTF-8 character."""
    text = tokenizer.decode(list(ids))
    if text.endswith(REPLACEMENT) or not text.startswith(sent):
        return ""
    return text[len(sent) :]


@dataclass(frozen=True)
class MapChoice:
    """Which maps an Attend request asked for (service.rpc.attend.attend_selection)."""

    kinds: Sequence[Kind]
    layers: Sequence[int]  # empty: every layer
    heads: Sequence[int]  # returned one by one
    mean: bool  # also the head mean of each layer


def pair_fields(
    tokenizer: Tokenizer, source: Sequence[int], target: Sequence[int], att: Attention, choice: MapChoice
) -> dict[str, Any]:
    """The fields an AttendResponse and a SentenceAttention share, for one pair: the source (end
    token included) and target ids (without it) and the pair's attention (a batch of one)."""
    maps = {  # (L, H, T, S) of the one pair
        pb.ATTENTION_KIND_CROSS: att.cross_attention[:, 0],
        pb.ATTENTION_KIND_ENCODER_SELF: att.encoder_attention[:, 0],
        pb.ATTENTION_KIND_DECODER_SELF: att.decoder_attention[:, 0],
    }
    eos = tokenizer.id_to_token(tokenizer.special.eos)
    return {
        "source_tokens": [tokenizer.source_token(t) for t in source],
        "target_tokens": [*(tokenizer.id_to_token(t) for t in target), eos],
        "matrices": attention_matrices(maps, choice.kinds, choice.layers, choice.heads, choice.mean),
        "alignment": alignment(maps[pb.ATTENTION_KIND_CROSS]),
    }


def alignment(cross: np.ndarray) -> list[int]:
    """Argmax over the source of the last layer's head-averaged cross-attention: (L, H, T, S) → T."""
    return [int(i) for i in np.argmax(cross[-1].mean(axis=0), axis=-1)]


def attention_matrices(
    maps: dict[Kind, np.ndarray],
    kinds: Sequence[Kind],
    layers: Sequence[int],
    heads: Sequence[int],
    mean: bool,
) -> list[pb.AttentionMatrix]:
    """The requested maps, by kind, then layer, then heads, then the head mean; maps[kind]: (L, H, T, S)."""
    out = []
    for kind in kinds:
        per_layer = maps[kind]
        for layer in layers or range(per_layer.shape[0]):
            rows, cols = per_layer.shape[-2:]
            chosen: list[tuple[int | None, np.ndarray]] = [(h, per_layer[layer, h]) for h in heads]
            if mean:
                chosen.append((None, per_layer[layer].mean(axis=0)))
            for head, values in chosen:
                m = pb.AttentionMatrix(kind=kind, layer=layer, rows=rows, cols=cols)
                m.values.extend(np.asarray(values, dtype=np.float32).ravel().tolist())
                if head is not None:
                    m.head = head
                out.append(m)
    return out


# --- the servicer -----------------------------------------------------------------------------------
