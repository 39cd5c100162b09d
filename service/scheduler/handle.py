"""The submitter's side of a request: await its outcome, stream its tokens, cancel it.

A `Handle` belongs to the event loop that submitted the request; the decode thread reaches it only
through an `Outbox`, which hands callbacks to the loop with `loop.call_soon_threadsafe`, so its
future and token queue are touched on the loop alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from service.scheduler.batch import Outcome
from service.scheduler.types import Generation

_END = None  # the token stream's end marker


Call = tuple[Callable[..., None], tuple[object, ...]]


class Outbox:
    """Callbacks from the decode thread to submitters' event loops, delivered in order at `flush`,
    one `call_soon_threadsafe` per loop: each wakes the loop with a write to its self-pipe, and one
    decoder step can stream to and settle dozens of requests. Used by one thread at a time."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[Call]] = {}

    def post(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> None:
        self._pending.setdefault(loop, []).append((fn, args))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, calls in pending.items():
            with contextlib.suppress(RuntimeError):  # the submitter's loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_call_all, calls)


def _nothing() -> None:
    pass


def _call_all(calls: list[Call]) -> None:
    for fn, args in calls:
        fn(*args)


class Handle:
    """The submitter's side of one request, bound to the event loop that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel: Callable[[], None], outbox: Outbox) -> None:
        self._loop, self._outbox = loop, outbox
        self._future: asyncio.Future[Generation] = loop.create_future()
        self._tokens: asyncio.Queue[tuple[int, ...] | None] = asyncio.Queue()
        self._cancel = cancel

    async def result(self) -> Generation:
        """The Generation, or raise the outcome error (QueueFull is raised by submit instead)."""
        return await asyncio.shield(self._future)

    async def tokens(self) -> AsyncIterator[int]:
        """Token ids of a stream request as they are chosen (greedy: each step; beam: at the end).

        Ends when the request ends, however it ends; await `result()` afterwards for the outcome.
        Together they are the best hypothesis's tokens. A request without `stream` yields nothing.
        """
        async for chunk in self.token_chunks():
            for token in chunk:
                yield token

    async def token_chunks(self) -> AsyncIterator[tuple[int, ...]]:
        """The same tokens, as what has arrived since the consumer last asked: one step's token while
        the consumer keeps up, several steps' together when it has fallen behind — so that a busy
        event loop sends fewer, larger stream messages instead of falling further behind."""
        while True:
            chunk = await self._tokens.get()
            if chunk is _END:
                return
            ended = False
            while not self._tokens.empty():
                more = self._tokens.get_nowait()
                if more is _END:
                    ended = True
                    break
                chunk += more
            yield chunk
            if ended:
                return

    def cancel(self) -> None:
        """Ask the request to leave: its rows go at the next step (outcome: RequestCancelledError)."""
        self._cancel()

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` on the submitter's loop once the request has ended (however it ended)."""
        self._future.add_done_callback(lambda _: callback())

    # The decode thread's side (delivered at the outbox's next flush).

    def _emit(self, tokens: Sequence[int]) -> None:
        self._call(self._tokens.put_nowait, tuple(tokens))

    def _settle(self, outcome: Outcome) -> None:
        self._call(self._set, outcome)

    def _set(self, outcome: Outcome) -> None:
        # The request has left the scheduler: nothing to cancel any more. Dropping the callable also
        # breaks the handle ⇄ ticket reference cycle (the ticket holds this handle's methods), so the
        # request's objects are freed when the last reference goes rather than left for the cyclic
        # garbage collector, whose collections stall every thread (server.freeze_startup_objects).
        self._cancel = _nothing
        if not self._future.done():
            if isinstance(outcome, BaseException):
                self._future.set_exception(outcome)
                self._future.exception()  # mark it retrieved: a caller that went away is no error
            else:
                self._future.set_result(outcome)
        self._tokens.put_nowait(_END)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        self._outbox.post(self._loop, fn, *args)
