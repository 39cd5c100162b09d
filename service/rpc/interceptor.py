"""Every call of translator.v1.Translator counted once, under the status its client sees.

`CallCounter` is the server's outermost interceptor and the one place that observes
`translator_requests_total` and `translator_request_duration_seconds`. A handler only sees the calls
that reach it; gRPC ends some before that: a message over `--max-message-bytes`, the deadline
passing or the client cancelling while the call waits for the event loop, the concurrent-calls
limit of `grpc.aio.server(maximum_concurrent_rpcs=...)`. What each case looks like from here, and
which cases no Python code sees, is in docs/metrics.md (Counting).

To see every call from its start, the counter serves a unary request as a one-message request
stream: its wrapper runs as soon as gRPC dispatches the call and reads the message itself, where
the plain unary path first waits for the message and quietly drops a call that ends meanwhile. The
servicer's methods are unchanged (request in; response or response stream out).

A client sends its deadline as a relative `grpc-timeout`, which gRPC rounds up (to 1 % at most) and
which starts on arrival: the server's copy of a deadline ends a little after the client's, and the
client's cancellation at its own deadline reaches the server first. `Call.deadline` is therefore
the client's deadline as the server can best tell it (`client_deadline`), and a call that ends
cancelled at or past it is DEADLINE_EXCEEDED, as its client saw it; before it, CANCELLED. The
handler's `context.time_remaining()` counts down to that same time, so the scheduler drops the
call's work when the call is counted expired, and the servicer's log line agrees with the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from service.metrics import RPCS, Metrics

# How much earlier than the server's copy a client's deadline may end: gRPC rounds the timeout it
# sends up to three significant figures (under 1 % of it; exact in ms below 1 s), and the transport
# takes its time both ways. docs/reliability.md (Counting) has the measurement.
DEADLINE_SLACK_RATIO = 0.01
DEADLINE_SLACK_S = 0.01

NO_MESSAGE = "the call ended its request stream without a request message"

_Handler = Callable[[Any, Any], Any]  # (request, grpc.aio.ServicerContext) → response or stream


def client_deadline(remaining: float | None, now: float) -> float | None:
    """When the client gives up, on the `time.monotonic()` clock, from the server's time remaining
    (`context.time_remaining()`, None: no deadline) read at `now`: the server's deadline less the
    slack its client's cancellation may arrive ahead of it by."""
    if remaining is None:
        return None
    return now + remaining - (DEADLINE_SLACK_S + DEADLINE_SLACK_RATIO * remaining)


@dataclass
class Call:
    """One intercepted call: what the counter knows of it, and its final code once it has ended."""

    rpc: str
    start: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # client_deadline, set when the handler starts
    started: bool = False  # the wrapper ran: gRPC did not refuse the call before any handler
    no_message: bool = False  # the request stream ended with no message (or gRPC dropped it)
    code: grpc.StatusCode | None = None  # set once, when the call has been counted

    def expired(self) -> bool:
        """Whether the client's deadline has passed (a cancellation now is the deadline's)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def ended_by(self, error: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        """The status the client sees of a handler that returned (`error` None) or raised `error`."""
        if isinstance(error, asyncio.CancelledError):  # gRPC ended the call: deadline or cancel
            return grpc.StatusCode.DEADLINE_EXCEEDED if self.expired() else grpc.StatusCode.CANCELLED
        if isinstance(error, grpc.aio.InternalError):
            # The status could not be sent (ExecuteBatchError): gRPC had ended the call already, at
            # its deadline, at its client's cancel, or, with no message read, refusing the message
            # as too large (it then drops the message and reports the end of the stream).
            if self.expired():
                return grpc.StatusCode.DEADLINE_EXCEEDED
            return grpc.StatusCode.RESOURCE_EXHAUSTED if self.no_message else grpc.StatusCode.CANCELLED
        code = context.code()  # what abort() or set_code() sent; gRPC sends UNKNOWN for a bare error
        if isinstance(code, grpc.StatusCode):
            return code
        return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class _CallContext:
    """The handler's view of its call's context, gRPC's own but for two methods: `time_remaining`
    is the client's (to `Call.deadline`), and `abort` counts the call before its status leaves, so
    that a client holding its status finds the call counted."""

    def __init__(
        self, context: grpc.aio.ServicerContext, call: Call, count: Callable[[grpc.StatusCode], None]
    ):
        self._context, self._call, self._count = context, call, count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self._count(code)
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("unreachable: abort raises")


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts every call of `service`'s RPCS in `metrics`; other services' calls pass untouched.

    Install it first (outermost) in `grpc.aio.server(interceptors=...)`, so that a call refused by an
    interceptor inside it (authentication) is counted too. Seeing every call start and end, it also
    tells a stopping server when its clients have gone quiet (`quiet`, RunningServer.stop).
    """

    def __init__(self, metrics: Metrics, service: str) -> None:
        self._metrics, self._prefix = metrics, f"/{service}/"
        self._in_progress = 0  # calls of the service whose task has not ended
        self._last_change = time.monotonic()  # when one last started or ended
        self._changed = asyncio.Event()  # set at each start and end; `quiet` clears it

    async def quiet(self, seconds: float, *, until: float) -> bool:
        """Wait until no call of the service is in progress and none has started or ended for
        `seconds`, or until `until` (on the `time.monotonic()` clock), whichever comes first.

        Returns:
            True once quiet; False at `until` with calls still in progress or arriving.
        """
        while True:
            now = time.monotonic()
            if self._in_progress == 0 and now - self._last_change >= seconds:
                return True
            if now >= until:
                return False
            wake = until if self._in_progress else min(until, self._last_change + seconds)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wake - now)

    def _changes(self, in_progress: int) -> None:
        self._in_progress += in_progress
        self._last_change = time.monotonic()
        self._changed.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        rpc = method.removeprefix(self._prefix)
        if handler is None or rpc == method or rpc not in RPCS:
            return handler
        call = Call(rpc)
        # The task that runs the call ends however the call ends, also when gRPC refuses it before
        # any handler; then the wrapper below never runs.
        task = asyncio.current_task()
        assert task is not None, "grpc.aio runs each call in a task"
        self._changes(+1)
        task.add_done_callback(lambda _: self._ended(call))
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(call, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(call, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # a client-streaming method: translator.v1 has none (server.add_translator)

    def _unary(self, call: Call, behaviour: _Handler) -> _Handler:
        async def unary(_requests: object, context: grpc.aio.ServicerContext) -> Any:
            error: BaseException | None = None
            try:
                request = await self._begin(call, context)
                return await behaviour(request, self._seen_by_handler(call, context))
            except BaseException as raised:
                error = raised
                raise
            finally:  # before gRPC sends the response
                self._count(call, call.ended_by(error, context))

        return unary

    def _stream(self, call: Call, behaviour: _Handler) -> _Handler:
        # A coroutine writing the responses itself (not an async generator handed to gRPC), so that a
        # cancellation while a response is written lands here too, and the count happens at once.
        async def stream(_requests: object, context: grpc.aio.ServicerContext) -> None:
            error: BaseException | None = None
            try:
                request = await self._begin(call, context)
                responses = behaviour(request, self._seen_by_handler(call, context))
                try:
                    async for response in responses:
                        await context.write(response)
                finally:
                    await responses.aclose()
            except BaseException as raised:
                error = raised
                raise
            finally:  # before gRPC sends the status
                self._count(call, call.ended_by(error, context))

        return stream

    async def _begin(self, call: Call, context: grpc.aio.ServicerContext) -> Any:
        """The call's request message, its deadline noted; a call without one is INVALID_ARGUMENT."""
        call.started = True
        call.deadline = client_deadline(context.time_remaining(), time.monotonic())
        request = await context.read()
        if request is grpc.aio.EOF:
            call.no_message = True
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_MESSAGE)
        return request

    def _seen_by_handler(self, call: Call, context: grpc.aio.ServicerContext) -> Any:
        return _CallContext(context, call, lambda code: self._count(call, code))

    def _ended(self, call: Call) -> None:
        if not call.started:  # gRPC answered RESOURCE_EXHAUSTED itself (maximum_concurrent_rpcs)
            self._count(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self._changes(-1)

    def _count(self, call: Call, code: grpc.StatusCode) -> None:
        if call.code is None:  # the first word is the one the client got
            call.code = code
            self._metrics.request_finished(call.rpc, code, time.monotonic() - call.start)
