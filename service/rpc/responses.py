"""Response messages of `translator.v1` built from decoding results: pure functions, no I/O.

The servicer (`service/rpc/servicer.py`) calls these to turn hypotheses, generations and attention
arrays into proto messages; keeping them apart keeps the servicer to the protocol's flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from google.protobuf.message import Message

from service.api.translator.v1 import translator_pb2 as pb
from service.decoding import Hypothesis, normalized_score
from service.modeldir.tokenizer import Tokenizer
from service.rpc.requests import InvalidRequestError, Kind, TextJob
from service.scheduler import FinishReason, Generation

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
    job: TextJob, gen: Generation, tokenizer: Tokenizer, options: pb.TranslateOptions, total_s: float
) -> pb.Translation:
    """The Translation of one text from its job and its Generation."""
    hypotheses = []
    for h in gen.hypotheses:
        hyp = pb.Hypothesis(
            text=tokenizer.decode(list(h.tokens)),
            score=float(h.score),
            normalized_score=normalized_score(h.score, h.length, job.options.length_penalty),
            finish_reason=pb.FINISH_REASON_END_OF_SEQUENCE if h.finished else pb.FINISH_REASON_LENGTH,
        )
        if options.return_tokens:
            hyp.tokens.extend(token_messages(h, tokenizer, len(job.options.forced)))
        hypotheses.append(hyp)
    best = gen.hypotheses[0]
    out = pb.Translation(
        text=hypotheses[0].text,
        finish_reason=FINISH_REASONS[gen.finish_reason],
        hypotheses=hypotheses,
        input_tokens=gen.input_tokens,
        output_tokens=best.length,
    )
    if options.return_timings:
        t = gen.timings
        out.timings.CopyFrom(
            pb.Timings(
                queue_seconds=t.queue_wait_s,
                time_to_first_token_seconds=t.time_to_first_token_s or 0.0,
                decode_seconds=t.decode_s,
                total_seconds=total_s,
            )
        )
    if job.seed is not None:
        out.seed = job.seed
    return out


def text_delta(tokenizer: Tokenizer, ids: Sequence[int], sent: str) -> str:
    """The text of `ids` beyond what was `sent`, or "" while it ends inside a UTF-8 character."""
    text = tokenizer.decode(list(ids))
    if text.endswith(REPLACEMENT) or not text.startswith(sent):
        return ""
    return text[len(sent) :]


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
