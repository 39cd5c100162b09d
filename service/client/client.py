"""A small synchronous Python client of `translator.v1.Translator`, results as frozen dataclasses.

    with TranslatorClient("localhost:50051") as client:
        (t,) = client.translate(["I love cats."])        # t.text == "J'aime les chats."
        beam = TranslateOptions(beam_size=4, n_best=2)    # options: one frozen dataclass
        client.translate(texts, beam)                     # or its fields as keywords:
        client.translate(texts, beam_size=4, n_best=2)    # the same request
        stream = client.translate_stream("I love cats.")
        for delta in stream:
            print(delta, end="", flush=True)
        stream.result                                     # the final Translation

Every gRPC error is re-raised as `TranslatorError` (status code name + the server's message).

    TranslatorClient("translator.example:443", tls=True, token=token)      # TLS, the system's CAs
    TranslatorClient(address, tls_ca="ca.crt", tls_cert="me.crt", tls_key="me.key")   # mutual TLS
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc

SERVICE = "translator.v1.Translator"
ATTENTION_KINDS = {
    "cross": pb.ATTENTION_KIND_CROSS,
    "encoder": pb.ATTENTION_KIND_ENCODER_SELF,
    "decoder": pb.ATTENTION_KIND_DECODER_SELF,
}
_KIND_NAMES = {value: name for name, value in ATTENTION_KINDS.items()}

# Retries are done by gRPC itself, per call: UNAVAILABLE (server starting, draining, or a connection
# that failed) and CANCELLED sent by the server (a server stopping cuts off the calls it still has,
# such as one that reached it through a balancer's kept-open connection as it shut down; a call the
# client cancels is never retried) are retried up to 4 attempts in all with exponential backoff of
# 0.2 s, 0.4 s, 0.8 s (each randomised, at most 2 s), within the call's deadline. Translating is
# idempotent (sampling is seeded), so a retry is safe. A stream is retried only until its first
# message has arrived. Other statuses (RESOURCE_EXHAUSTED included) are not retried.
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
# round_robin: with a target that resolves to several servers (`dns:///translator-headless:50051` in
# Kubernetes, deploy/k8s/README.md) every call goes to the next ready one, instead of all calls of
# the channel to the first address (grpc's default, pick_first). Harmless with one address.
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE}, {"service": "grpc.health.v1.Health"}],
                "retryPolicy": RETRY_POLICY,
            }
        ],
    }
)


class TranslatorError(Exception):
    """A failed call: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `message` the server's,
    `request_id` the id the server logged the call under (its `x-request-id` trailer), when known."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.code, self.message, self.request_id = code, message, request_id

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> TranslatorError:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else None
        trailers: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        request_id = next((v for k, v in trailers or () if k == "x-request-id"), None)
        return cls(
            code.name if code is not None else "UNKNOWN",
            details or str(err),
            str(request_id) if request_id is not None else None,
        )


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """One generated token: id, vocabulary piece (e.g. "Ġchats"), log-probability, flags."""

    id: int
    piece: str
    logprob: float
    special: bool
    forced: bool


@dataclass(frozen=True)
class Hypothesis:
    """One search output; `finish_reason` is "END_OF_SEQUENCE" or "LENGTH"."""

    text: str
    score: float
    normalized_score: float
    finish_reason: str
    tokens: tuple[Token, ...] = ()


@dataclass(frozen=True)
class Timings:
    """Where the time of one text went, in seconds (see the proto's Timings)."""

    queue_seconds: float
    time_to_first_token_seconds: float
    decode_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class Translation:
    """The translation of one text: the best hypothesis's text first, then every hypothesis."""

    text: str
    finish_reason: str
    hypotheses: tuple[Hypothesis, ...]
    input_tokens: int
    output_tokens: int
    model: str
    timings: Timings | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Attention:
    """Attention maps of a source/target pair.

    `matrices` maps (kind, layer, head) to a float32 array of shape (rows, cols); kind is "cross",
    "encoder" or "decoder", head None is the mean over heads. `alignment[i]` is the index into
    `source_tokens` that `target_tokens[i]` attends to most (last decoder layer, head mean).

    A source of several sentences is attended sentence by sentence: `sentences` holds one
    Attention per sentence pair, in order (its `source` the source sentence, its `target` the
    target sentence), and this one's tokens, matrices and alignment are empty (`target` is the
    whole target).
    """

    model: str
    target: str
    source_tokens: tuple[str, ...]
    target_tokens: tuple[str, ...]
    matrices: dict[tuple[str, int, int | None], np.ndarray]
    alignment: tuple[int, ...]
    sentences: tuple[Attention, ...] = ()
    source: str = ""  # in an entry of `sentences`: its source sentence


def _attention(model: str, m: pb.AttendResponse | pb.SentenceAttention, source: str = "") -> Attention:
    """The pair an AttendResponse or one of its SentenceAttention entries describes."""
    matrices = {
        (_KIND_NAMES[x.kind], x.layer, x.head if x.HasField("head") else None): np.asarray(
            x.values, dtype=np.float32
        ).reshape(x.rows, x.cols)
        for x in m.matrices
    }
    tokens = tuple(m.source_tokens), tuple(m.target_tokens)
    return Attention(model, m.target, *tokens, matrices, tuple(m.alignment), source=source)


@dataclass(frozen=True)
class ModelInfo:
    """One loaded model: identity, precision, shape and request limits."""

    name: str
    version: str
    source_language: str
    target_language: str
    languages: tuple[str, ...]  # a multilingual model's codes; empty for a bilingual one
    variant: str
    execution_providers: tuple[str, ...]
    encoder_layers: int
    decoder_layers: int
    heads: int
    vocab_size: int
    max_source_tokens: int
    max_output_tokens: int
    max_texts_per_request: int
    max_beam_size: int
    default: bool


def _finish_reason(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_")  # type: ignore[arg-type]


def _translation(t: pb.Translation, model: str) -> Translation:
    hypotheses = tuple(
        Hypothesis(
            text=h.text,
            score=h.score,
            normalized_score=h.normalized_score,
            finish_reason=_finish_reason(h.finish_reason),
            tokens=tuple(Token(k.id, k.piece, k.logprob, k.special, k.forced) for k in h.tokens),
        )
        for h in t.hypotheses
    )
    timings = None
    if t.HasField("timings"):
        x = t.timings
        timings = Timings(x.queue_seconds, x.time_to_first_token_seconds, x.decode_seconds, x.total_seconds)
    return Translation(
        text=t.text,
        finish_reason=_finish_reason(t.finish_reason),
        hypotheses=hypotheses,
        input_tokens=t.input_tokens,
        output_tokens=t.output_tokens,
        model=model,
        timings=timings,
        seed=t.seed if t.HasField("seed") else None,
    )


UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1  # the largest values of unsigned proto fields


def _check_unsigned(name: str, value: int | None, high: int) -> None:
    """Refuses what an unsigned proto field cannot hold, naming the option: protobuf's own error
    ("Value out of range: -1") says neither which option nor what range."""
    if value is not None and not 0 <= value <= high:
        raise ValueError(f"{name} must be between 0 and {high}, got {value}")


def _unsigned(default: int | None, high: int = UINT32_MAX) -> Any:
    """A dataclass field for an unsigned proto field, at most `high`: checked when made, read by the CLI."""
    return field(default=default, metadata={"max": high})


@dataclass(frozen=True, kw_only=True)
class TranslateOptions:
    """How to translate: the options of a Translate or TranslateStream call, checked when made.

    Attributes:
        beam_size: None (the default: the model's own, greedy unless an imported checkpoint ships
            num_beams), 1 (greedy), the beam width of a beam search (at most the model's
            max_beam_size), or 0 for a beam search of the server's default width, 4.
        n_best: hypotheses per translation (more than 1 needs beam search).
        length_penalty: beam search ranking exponent alpha (None: the server's 1.0).
        sample: sample instead of searching, with `temperature`, `top_k` (0: off), `top_p`
            (1.0: off) and `seed` (None: the server picks one, see Translation.seed).
        max_output_tokens: generated-token limit (0: the server's default).
        min_output_tokens: tokens before the end token may be chosen (0: none).
        target_prefix: text the translation must start with ("": none).
        model: model name ("": the server's default model).
        source_language, target_language: codes as the model names them (ModelInfo.languages);
            a multilingual model needs target_language ("": a bilingual model's own pair).
        return_tokens: fill Hypothesis.tokens.
        return_timings: fill Translation.timings.
        no_sentence_split: translate each text whole, as one sentence (by default the server
            splits a text into sentences and joins their translations with the text's spacing).

    Raises:
        ValueError: `sample` together with beam search (beam_size other than 1, or a
            length_penalty), or an integer outside its proto field's range (e.g. a negative one).
    """

    beam_size: int | None = _unsigned(None)
    n_best: int = _unsigned(1)
    length_penalty: float | None = None
    sample: bool = False
    temperature: float = 1.0
    top_k: int = _unsigned(0)
    top_p: float = 1.0
    seed: int | None = _unsigned(None, UINT64_MAX)
    max_output_tokens: int = _unsigned(0)
    min_output_tokens: int = _unsigned(0)
    target_prefix: str = ""
    model: str = ""
    source_language: str = ""
    target_language: str = ""
    return_tokens: bool = False
    return_timings: bool = False
    no_sentence_split: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            if "max" in f.metadata:
                _check_unsigned(f.name, getattr(self, f.name), f.metadata["max"])
        if self.sample and self._beam:
            raise ValueError(
                f"sampling and beam search exclude each other (beam_size {self.beam_size}"
                + ("" if self.length_penalty is None else f", length_penalty {self.length_penalty}")
                + "): use beam_size=1 and no length_penalty with sample=True"
            )

    @property
    def _beam(self) -> bool:
        # beam_size 0 is the proto's "default width", a beam search: only 1 means greedy, None
        # the model's default (no strategy sent).
        return self.beam_size not in (None, 1) or self.length_penalty is not None

    def to_proto(self) -> pb.TranslateOptions:
        """The TranslateOptions message. Values are sent as given, meaning what the proto says:
        beam_size 0 is a beam search of the server's default width (4), not greedy decoding."""
        options = pb.TranslateOptions(
            model=self.model,
            stopping=pb.StoppingCriteria(
                max_output_tokens=self.max_output_tokens, min_output_tokens=self.min_output_tokens
            ),
            n_best=self.n_best,
            target_prefix=self.target_prefix,
            return_tokens=self.return_tokens,
            return_timings=self.return_timings,
            source_language=self.source_language,
            target_language=self.target_language,
            no_sentence_split=self.no_sentence_split,
        )
        if self.sample:
            options.sampling.CopyFrom(
                pb.Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
            )
        elif self._beam:
            options.beam.CopyFrom(
                pb.BeamSearch(beam_size=self.beam_size or 0, length_penalty=self.length_penalty)
            )
        elif self.beam_size == 1:
            options.greedy.SetInParent()
        return options


def _message(options: TranslateOptions | None, overrides: dict[str, Any]) -> pb.TranslateOptions:
    """`options` (None: the defaults) with `overrides` replacing some of its fields, as a message."""
    return replace(options or TranslateOptions(), **overrides).to_proto()


class TranslationStream(Iterator[str]):
    """The text deltas of a TranslateStream call; once exhausted, `result` is the final Translation."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.result: Translation | None = None

    def __next__(self) -> str:
        try:
            while True:
                message = next(self._call)
                if message.HasField("delta"):
                    return str(message.delta.text)
                final = message.final
                self.result = _translation(final.translations[0], final.model)
        except grpc.RpcError as err:
            raise TranslatorError.from_rpc_error(err) from None

    def cancel(self) -> None:
        """Stops the call; the server drops its work (the stream then ends with CANCELLED)."""
        self._call.cancel()


class TranslatorClient:
    """A synchronous client over one gRPC channel to a translator server.

    The channel carries a gRPC service config that retries UNAVAILABLE (server starting up,
    draining, or unreachable) up to 4 attempts in all, with exponential backoff from 0.2 s
    doubling to at most 2 s (`RETRY_POLICY`), every attempt within the call's deadline. Other
    statuses are raised at once as `TranslatorError`.

    Args:
        address: "host:port" of the server.
        timeout: the deadline of every call in seconds (None: no deadline).
        tls: speak TLS, verifying the server against the system's CAs (implied by the tls_ options).
        tls_ca: PEM file of the CA that signed the server's certificate (instead of the system's).
        tls_cert, tls_key: PEM files of this client's certificate and key, for mutual TLS.
        token: a bearer token sent with every call (`authorization: Bearer <token>`); over plaintext
            anyone on the path reads it: use it with TLS (this client's, or a proxy's in front).

    Raises:
        ValueError: only one of tls_cert and tls_key.
        OSError: a tls_ file cannot be read.
    """

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        timeout: float | None = 30.0,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
    ) -> None:
        self.address, self.timeout = address, timeout
        options = [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG)]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: a client certificate needs its key")
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self._stub = pb_grpc.TranslatorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def translate(
        self, texts: Sequence[str], options: TranslateOptions | None = None, **overrides: Any
    ) -> list[Translation]:
        """Translates texts with one set of options, one Translation per text in order.

        Args:
            texts: non-empty texts (at most the model's max_texts_per_request).
            options: how to translate (None: `TranslateOptions()`, greedy on the default model).
            **overrides: TranslateOptions fields that replace those of `options`, e.g.
                `translate(texts, beam_size=4, n_best=2)`; an unknown name is a TypeError.

        Returns:
            One Translation per text.

        Raises:
            TranslatorError: the call failed (e.g. INVALID_ARGUMENT with the limit it broke).
            ValueError: options that cannot be sent (see `TranslateOptions`); nothing was sent.
        """
        request = pb.TranslateRequest(texts=list(texts), options=_message(options, overrides))
        response = self._call(self._stub.Translate, request)
        return [_translation(t, response.model) for t in response.translations]

    def translate_stream(
        self, text: str, options: TranslateOptions | None = None, **overrides: Any
    ) -> TranslationStream:
        """Translates one text, yielding text deltas as they are decoded.

        Args:
            text: the text to translate.
            options, **overrides: as for `translate`. The server decodes streams greedily or by
                sampling only: beam search or n_best > 1 is sent as given and refused
                (INVALID_ARGUMENT, raised by the first `next`), never quietly decoded another way.

        Returns:
            An iterator of deltas that concatenate to the translation; after the last one its
            `result` attribute holds the final Translation.
        """
        request = pb.TranslateStreamRequest(text=text, options=_message(options, overrides))
        call = self._stub.TranslateStream(request, timeout=self.timeout, metadata=self._metadata)
        return TranslationStream(call)

    def attend(
        self,
        source: str,
        target: str | None = None,
        *,
        kinds: Sequence[str] = ("cross",),
        layers: Sequence[int] = (),
        heads: Sequence[int] = (),
        average_heads: bool = True,
        model: str = "",
        source_language: str = "",
        target_language: str = "",
        no_sentence_split: bool = False,
    ) -> Attention:
        """The attention maps of the model for a source text and a target text.

        Args:
            source: the source text.
            target: the target text (None: the server's greedy translation of the source).
            kinds: any of "cross", "encoder", "decoder".
            layers: 0-based layers to return (empty: every layer).
            heads: 0-based heads to return individually (empty: none).
            average_heads: also return the mean over heads (always returned when `heads` is empty).
            model: model name ("": the default model).
            source_language, target_language: as in TranslateOptions.
            no_sentence_split: attend to the source and the target whole, as one pair (by default
                a source of several sentences is attended sentence by sentence).

        Returns:
            The Attention: tokens, matrices keyed by (kind, layer, head or None), alignment; per
            sentence pair in `sentences` for a source of several sentences.

        Raises:
            TranslatorError: the call failed.
            ValueError: an unknown kind, or a negative layer or head; nothing was sent.
        """
        unknown = [k for k in kinds if k not in ATTENTION_KINDS]
        if unknown:
            raise ValueError(f"unknown attention kinds {unknown}: use {sorted(ATTENTION_KINDS)}")
        for layer in layers:
            _check_unsigned("layers entry", layer, UINT32_MAX)
        for head in heads:
            _check_unsigned("heads entry", head, UINT32_MAX)
        request = pb.AttendRequest(
            model=model,
            source=source,
            target=target,
            kinds=[ATTENTION_KINDS[k] for k in kinds],
            layers=layers,
            heads=heads,
            average_heads=average_heads,
            source_language=source_language,
            target_language=target_language,
            no_sentence_split=no_sentence_split,
        )
        r = self._call(self._stub.Attend, request)
        sentences = tuple(_attention(r.model, s, s.source) for s in r.sentences)
        return replace(_attention(r.model, r, "" if sentences else source), sentences=sentences)

    def model_info(self) -> list[ModelInfo]:
        """Every model the server has loaded, in name order; `default` marks the default one."""
        r = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest())
        return [
            ModelInfo(
                name=m.name,
                version=m.version,
                source_language=m.source_language,
                target_language=m.target_language,
                languages=tuple(m.languages),
                variant=pb.ModelVariant.Name(m.variant).removeprefix("MODEL_VARIANT_"),
                execution_providers=tuple(m.execution_providers),
                encoder_layers=m.architecture.encoder_layers,
                decoder_layers=m.architecture.decoder_layers,
                heads=m.architecture.heads,
                vocab_size=m.architecture.vocab_size,
                max_source_tokens=m.limits.max_source_tokens,
                max_output_tokens=m.limits.max_output_tokens,
                max_texts_per_request=m.limits.max_texts_per_request,
                max_beam_size=m.limits.max_beam_size,
                default=m.name == r.default_model,
            )
            for m in r.models
        ]

    def health(self, service: str = "") -> str:
        """The standard health status of `service` ("": the whole server), e.g. "SERVING"."""
        r = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> TranslatorClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise TranslatorError.from_rpc_error(err) from None


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
