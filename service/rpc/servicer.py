"""The gRPC servicer of `translator.v1.Translator`: proto ⇄ domain, and errors → status codes.

Each RPC validates its request (`service.rpc.requests` for Translate/TranslateStream and Attend),
submits one scheduler `Request` per sentence of each text with the call's deadline, all at once so
that they decode as rows of the same batch, awaits the outcomes and builds the response (a text's
sentences joined again, `service.rpc.responses`).
`_handled` is the one place where exceptions become gRPC statuses; it also writes one structured
log line per call. The calls are counted where gRPC sees them, in `service.rpc.interceptor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.config import Config
from service.engine.engine import Engine, ModelInfo, ModelNotFoundError
from service.metrics import Metrics
from service.modeldir.tokenizer import Tokenizer
from service.rpc.attend import attend_pairs, attend_selection, check_attend_sizes
from service.rpc.requests import (
    InvalidRequestError,
    RequestLimits,
    SchedulerShare,
    SentenceJob,
    TextJob,
    UndecodableRequest,
    check_sizes,
    decoded,
    translate_jobs,
)
from service.rpc.responses import (
    MapChoice,
    pair_fields,
    text_delta,
    translation_message,
    within_message_limit,
)
from service.scheduler import (
    DeadlineExceededError,
    Generation,
    Handle,
    QueueFullError,
    Request,
    RequestCancelledError,
    RequestTooLargeError,
    SchedulerClosedError,
)
from service.scheduler.pool import SchedulerPool

log = logging.getLogger(__name__)
_Reply = TypeVar("_Reply", bound=Message)
_T = TypeVar("_T")

VARIANTS = {"fp32": pb.MODEL_VARIANT_FP32, "optimized": pb.MODEL_VARIANT_FP32}
VARIANTS |= {"int8": pb.MODEL_VARIANT_INT8, "fp16": pb.MODEL_VARIANT_FP16}


class NotReadyError(Exception):
    """The server is still warming up, or shutting down (UNAVAILABLE)."""


# --- exceptions → statuses: the one place -----------------------------------------------------------

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestTooLargeError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SchedulerClosedError, grpc.StatusCode.UNAVAILABLE),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
)


# A status message travels in a trailer, percent-encoded (up to 3 bytes per UTF-8 byte), and a
# client refuses trailers over its metadata limit (8 KiB by default) with RESOURCE_EXHAUSTED, a code
# it may retry forever: no message may echo more than this of what a client sent.
MAX_MESSAGE_BYTES = 2000


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message of an exception (INTERNAL hides the details),
    the message cut to MAX_MESSAGE_BYTES of UTF-8."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code, _bounded(str(error))
    return grpc.StatusCode.INTERNAL, "internal error while translating; see the server log"


def _bounded(message: str) -> str:
    data = message.encode("utf-8")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    return data[: MAX_MESSAGE_BYTES - 3].decode("utf-8", errors="ignore") + "…"


@dataclass
class CallRecord:
    """What the log line of one call says; handlers fill in the model and token counts."""

    rpc: str
    request_id: str
    start: float = field(default_factory=time.monotonic)
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0

    def fields(self, code: grpc.StatusCode) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "rpc": self.rpc,
            "model": self.model,
            "status": code.name,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "duration_s": round(time.monotonic() - self.start, 6),
        }


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` (cut to 64 characters) when it is one token of letters, digits
    and `._:/+=-`, else a fresh one: an id with spaces or quotes would write fields of its own into
    the text log line (`x status=OK rpc=Fake`)."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value[:64]):
            return value[:64]
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]+")


# Made-up request ids: random per process (replicas differ), then a counter; uuid4 per call cost
# more than all the rest of the id handling.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()
_STARTING = "the server is starting (loading and warming up the model); retry shortly"
_STOPPING = "the server is shutting down and takes no new calls; retry (another replica)"
# What a client can ask for instead of a response over --max-message-bytes, per RPC.
_SMALLER_TRANSLATION = "fewer texts per call, fewer hypotheses (n_best) or no tokens (return_tokens)"
_SMALLER_STREAM = "no tokens (return_tokens) or fewer output tokens (max_output_tokens)"
_SMALLER_ATTENTION = (
    "fewer attention maps (kinds, layers, heads; with no heads, one head-averaged map per layer and "
    "kind) or shorter texts"
)


# Requests with more characters than this are split into sentences and tokenised on a worker
# thread, not on the event loop that serves every call: ≈5 ms of work at this size, ≈0.6 s for
# 500,000 characters (docs/reliability.md).
OFF_LOOP_CHARS = 4096


async def _off_loop(work: Callable[[], _T], chars: int) -> _T:
    """`work()` for a request of `chars` characters: on a worker thread when it is large."""
    if chars <= OFF_LOOP_CHARS:
        return work()
    return await asyncio.to_thread(work)


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


# --- pure helpers: domain → proto -------------------------------------------------------------------


def _delta(text: str, token_ids: Sequence[int] = ()) -> pb.TranslateStreamResponse:
    return pb.TranslateStreamResponse(delta=pb.TextDelta(text=text, token_ids=token_ids))


async def _sentence_deltas(
    tokenizer: Tokenizer, handle: Handle, request_id: str
) -> AsyncIterator[tuple[str, tuple[int, ...]]]:
    """(text, token ids) of one sentence's stream as it decodes, then any text held back at its end
    (a cut UTF-8 character): together its translation's text."""
    ids: list[int] = []
    sent = ""
    async for chunk in handle.token_chunks():  # several tokens when the loop fell behind
        ids.extend(chunk)
        new = text_delta(tokenizer, ids, sent)
        sent += new
        yield new, chunk
    text = tokenizer.decode(list((await handle.result()).hypotheses[0].tokens))
    if text != sent:
        if not text.startswith(sent):
            log.warning("request %s: streamed text is not a prefix of the result", request_id)
        yield text[len(sent) :], ()


class TranslatorServicer(pb_grpc.TranslatorServicer):
    """translator.v1.Translator over an engine (models, attention) and a scheduler (decoding)."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        # The server listens while the model loads (health NOT_SERVING): until `attach`, every call
        # is refused with UNAVAILABLE, and decoding until `ready` (set once the engine is warm).
        self._engine: Engine | None = None
        self._scheduler: SchedulerPool | None = None
        self._tokenizers: dict[str, Tokenizer] = {}
        self._request_limits: dict[str, RequestLimits] = {}
        self.ready = False
        self.draining = False  # set when shutdown begins: every new call is refused (UNAVAILABLE)

    def attach(self, engine: Engine, scheduler: SchedulerPool) -> None:
        """The loaded engine and its scheduler: calls that need no decoding are answered from now on."""
        self._tokenizers = {
            name: Tokenizer.from_file(engine.graphs(name).model_dir / engine.graphs(name).manifest.tokenizer)
            for name in engine.models
        }
        self._engine, self._scheduler = engine, scheduler

    @property
    def engine(self) -> Engine:
        self._refuse_while_loading()
        assert self._engine is not None
        return self._engine

    @property
    def scheduler(self) -> SchedulerPool:
        self._refuse_while_loading()
        assert self._scheduler is not None
        return self._scheduler

    @property
    def tokenizers(self) -> dict[str, Tokenizer]:
        self._refuse_while_loading()
        return self._tokenizers

    def _refuse_while_loading(self) -> None:
        if self._engine is None:
            self._not_ready()

    @contextlib.asynccontextmanager
    async def _handled(self, rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[CallRecord]:
        """Run one call: map its exception to a status, log it once."""
        call = CallRecord(rpc, _request_id(context))
        # The id the log line carries goes back to the caller (for a bug report) whatever the outcome.
        trailer = (("x-request-id", call.request_id),)
        context.set_trailing_metadata(trailer)
        code, message = grpc.StatusCode.OK, ""
        try:
            if self.draining:  # every RPC, also those that need no decoding (GetModelInfo, Attend)
                self.metrics.request_rejected("draining")
                raise NotReadyError(_STOPPING)
            yield call
        except (GeneratorExit, asyncio.CancelledError):  # the client went away or its deadline passed
            # (GeneratorExit: a stream closed as its call ended). The time remaining is the client's
            # (service.rpc.interceptor): none left, it was the deadline, as the call is counted.
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED
            )
            raise
        except Exception as error:
            code, message = status_of(error)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("request %s (%s) failed", call.request_id, rpc)
            elif _deadline_passed(context):  # gRPC ends the call itself: what the client gets
                code = grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            fields = call.fields(code)
            log.info("%s %s", rpc, code.name, extra={"fields": fields})
        if code != grpc.StatusCode.OK:
            if context.done() or _deadline_passed(context):
                # gRPC has ended the call or is ending it (DEADLINE_EXCEEDED): a status sent now
                # fails in its core and is logged as an ERROR with a traceback. End as gRPC's own
                # cancellation does, quietly; the log line above has the outcome.
                raise asyncio.CancelledError
            await context.abort(code, message, trailer)

    def _model(self, name: str) -> tuple[str, ModelInfo]:
        info = self.engine.model(name or None)
        return info.name, info

    def _limits(self, info: ModelInfo) -> RequestLimits:
        """The model's and the server's limits, with what one scheduler instance holds: a request is
        checked against all of them up front, and GetModelInfo reports the tighter ones."""
        cached = self._request_limits.get(info.name)
        if cached is not None:  # fixed once attached; built once per model rather than per call
            return cached
        server, pool = self.config.server, self.scheduler
        limits = self._request_limits[info.name] = RequestLimits(
            max_texts_per_request=server.max_texts_per_request,
            max_sentences_per_request=server.max_sentences_per_request,
            max_beam_size=server.max_beam_size,
            max_source_tokens=info.limits.max_source_tokens,
            max_output_tokens=info.limits.max_target_tokens,
            vocab_size=info.dims.vocab_size,
            languages=info.languages,
            decoding=self.engine.graphs(info.name).manifest.decoding,
            scheduler=SchedulerShare(
                max_sequences=pool.share.max_sequences,
                max_kv_cache_tokens=pool.share.max_kv_cache_tokens,
                queue_capacity=pool.queue_capacity,
                split=pool.split,
                queue_setting=pool.queue_setting,
            ),
        )
        return limits

    def _fitting(self, message: _Reply, ask_for: str) -> _Reply:
        """`message` if gRPC can send it (see responses.ResponseTooLargeError)."""
        return within_message_limit(message, self.config.server.max_message_bytes, ask_for)

    def _refuse_until_warm(self) -> None:
        """Decoding waits for the warm-up: until then a call that would decode is refused."""
        if not self.ready:
            self._not_ready()

    def _not_ready(self) -> NoReturn:
        self.metrics.request_rejected("not_ready")
        raise NotReadyError(_STARTING)

    async def _jobs(
        self, texts: Sequence[str], options: pb.TranslateOptions, call: CallRecord, *, streaming: bool
    ) -> tuple[ModelInfo, list[TextJob]]:
        self._refuse_until_warm()
        name, info = self._model(options.model)
        call.model = name
        tokenizer, limits = self.tokenizers[name], self._limits(info)
        check_sizes(texts, options, tokenizer, limits)  # what cannot fit, refused at once
        jobs = await _off_loop(
            lambda: translate_jobs(
                texts,
                options,
                tokenizer,
                limits,
                language=options.source_language or info.languages.source,
                streaming=streaming,
                new_seed=lambda: secrets.randbits(63),
            ),
            sum(map(len, texts)) + len(options.target_prefix),
        )
        call.input_tokens = sum(len(s.source_ids) for j in jobs for s in j.sentences)
        return info, jobs

    @contextlib.contextmanager
    def _submitted(
        self, model: str, sentences: Sequence[SentenceJob], context: grpc.aio.ServicerContext, stream: bool
    ) -> Iterator[list[Handle]]:
        """Every sentence submitted at once, so that they decode side by side; any still running
        when the block ends (one failed, the call was cancelled) is cancelled."""
        remaining = context.time_remaining()  # the client's (service.rpc.interceptor)
        deadline = None if remaining is None else time.monotonic() + remaining
        handles: list[Handle] = []
        try:
            for s in sentences:
                request = Request(model, s.source_ids, s.options, deadline, stream)
                handles.append(self.scheduler.submit(request))
            yield handles
        finally:
            for h in handles:
                if not h.done():
                    h.cancel()  # the client went away or a sibling failed: the row leaves at the next step

    async def _generate(
        self, model: str, jobs: Sequence[TextJob], context: grpc.aio.ServicerContext
    ) -> list[list[Generation]]:
        """Decode every sentence of every job; each job's Generations, in order."""
        sentences = [s for job in jobs for s in job.sentences]
        with self._submitted(model, sentences, context, stream=False) as handles:
            flat = iter(await asyncio.gather(*(h.result() for h in handles)))
        return [[next(flat) for _ in job.sentences] for job in jobs]

    async def Translate(
        self, request: pb.TranslateRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranslateResponse:
        async with self._handled("Translate", context) as call:
            request = decoded(request)
            info, jobs = await self._jobs(request.texts, request.options, call, streaming=False)
            generations = await self._generate(info.name, jobs, context)
            total = time.monotonic() - call.start
            tokenizer = self.tokenizers[info.name]
            translations = [
                translation_message(job, gens, tokenizer, request.options, total)
                for job, gens in zip(jobs, generations, strict=True)
            ]
            call.output_tokens = sum(t.output_tokens for t in translations)
            response = pb.TranslateResponse(
                translations=translations, model=info.name, model_version=info.version
            )
            return self._fitting(response, _SMALLER_TRANSLATION)
        raise AssertionError("unreachable: _handled aborts the call on error")

    async def TranslateStream(
        self, request: pb.TranslateStreamRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        async with self._handled("TranslateStream", context) as call:
            request = decoded(request)
            info, (job,) = await self._jobs([request.text], request.options, call, streaming=True)
            tokenizer = self.tokenizers[info.name]
            gens: list[Generation] = []
            # Every sentence decodes from the start; their tokens wait in their handles until the
            # sentences before them have been sent.
            with self._submitted(info.name, job.sentences, context, stream=True) as handles:
                for gap, handle in zip(job.split.gaps, handles, strict=False):
                    if gap:  # the spacing before this sentence, as the text had it
                        yield self._fitting(_delta(gap), _SMALLER_STREAM)
                    async for text, ids in _sentence_deltas(tokenizer, handle, call.request_id):
                        yield self._fitting(_delta(text, ids), _SMALLER_STREAM)
                    gens.append(await handle.result())
            if job.split.gaps[-1]:
                yield self._fitting(_delta(job.split.gaps[-1]), _SMALLER_STREAM)
            final = translation_message(job, gens, tokenizer, request.options, time.monotonic() - call.start)
            call.output_tokens = final.output_tokens
            response = pb.TranslateResponse(translations=[final], model=info.name, model_version=info.version)
            yield self._fitting(pb.TranslateStreamResponse(final=response), _SMALLER_STREAM)

    async def Attend(
        self, request: pb.AttendRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttendResponse:
        async with self._handled("Attend", context) as call:
            request = decoded(request)
            name, info = self._model(request.model)
            call.model = name
            tokenizer = self.tokenizers[name]
            limits = self._limits(info)
            kinds, layers, heads = attend_selection(request, self.engine.graphs(name).manifest.shape)
            choice = MapChoice(kinds, layers, heads, mean=request.average_heads or not heads)
            check_attend_sizes(request, tokenizer, limits)  # what cannot fit, refused at once
            chars = len(request.source) + len(request.target)
            pairs = await _off_loop(lambda: attend_pairs(request, tokenizer, limits, info.languages), chars)
            if pairs.target is not None:
                spacing, targets = pairs.target, pairs.target_ids
                texts = list(spacing.sentences)
            else:
                self._refuse_until_warm()
                options = pb.TranslateOptions(
                    no_sentence_split=request.no_sentence_split,
                    source_language=request.source_language,
                    target_language=request.target_language,
                )
                language = request.source_language or info.languages.source
                (job,) = await _off_loop(
                    lambda: translate_jobs(
                        [request.source], options, tokenizer, limits, language=language, new_seed=int
                    ),
                    chars,
                )
                (gens,) = await self._generate(name, [job], context)
                spacing = job.split  # the translations take the source's spacing, as in Translate
                targets = tuple(g.hypotheses[0].tokens for g in gens)
                texts = [tokenizer.decode(list(t)) for t in targets]
            call.input_tokens = sum(len(s) for s in pairs.source_ids)
            call.output_tokens = sum(len(t) + 1 for t in targets)
            bos = info.dims.bos_id
            maps = await asyncio.to_thread(  # pair by pair: each as if it were alone, unpadded
                lambda: [
                    self.engine.attention(name, [s], [[bos, *t]])
                    for s, t in zip(pairs.source_ids, targets, strict=True)
                ]
            )
            reports = [
                pair_fields(tokenizer, s, t, att, choice)
                for s, t, att in zip(pairs.source_ids, targets, maps, strict=True)
            ]
            response = pb.AttendResponse(model=name, target=spacing.join(texts))
            if len(reports) == 1:  # one pair: the response's own fields, as before sentences
                response.MergeFrom(pb.AttendResponse(**reports[0]))
            else:
                response.sentences.extend(
                    pb.SentenceAttention(source=source, target=text, **report)
                    for source, text, report in zip(pairs.source.sentences, texts, reports, strict=True)
                )
            return self._fitting(response, _SMALLER_ATTENTION)
        raise AssertionError("unreachable: _handled aborts the call on error")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        async with self._handled("GetModelInfo", context) as call:
            decoded(request)
            models = [self._model_info(info) for _, info in sorted(self.engine.models.items())]
            call.model = self.engine.default_model
            return pb.GetModelInfoResponse(models=models, default_model=self.engine.default_model)
        raise AssertionError("unreachable: _handled aborts the call on error")

    def _model_info(self, info: ModelInfo) -> pb.ModelInfo:
        graphs = self.engine.graphs(info.name)
        shape = graphs.manifest.shape
        limits = self._limits(info)
        return pb.ModelInfo(
            name=info.name,
            version=info.version,
            source_language=info.languages.source,
            target_language=info.languages.target,
            languages=list(self.tokenizers[info.name].languages),
            variant=VARIANTS.get(info.variant, pb.MODEL_VARIANT_UNSPECIFIED),
            execution_providers=graphs.decoder_step.get_providers(),
            architecture=pb.ModelArchitecture(
                encoder_layers=shape.encoder_layers,
                decoder_layers=shape.decoder_layers,
                heads=shape.heads,
                d_model=shape.d_model,
                vocab_size=shape.vocab_size,
            ),
            # what a request can get, so that one within them never fails for its size
            limits=pb.ModelLimits(
                max_source_tokens=limits.max_source_tokens,
                max_output_tokens=limits.effective_max_output_tokens,
                max_texts_per_request=limits.effective_max_texts,
                max_sentences_per_request=limits.effective_max_sentences,
                max_beam_size=limits.effective_max_beam_size,
                max_batch_size=self.scheduler.share.max_sequences,  # one decode loop's step
            ),
        )
