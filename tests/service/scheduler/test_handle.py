"""Handle: a stream's tokens reach the submitter's loop in order, one step at a time while the
consumer keeps up, and together when it has fallen behind."""

from __future__ import annotations

import asyncio

import pytest

from service.scheduler.handle import Handle, Outbox
from service.scheduler.types import RequestCancelledError


def test_stream_tokens_come_per_step_or_together_when_the_consumer_fell_behind() -> None:
    async def main() -> None:
        outbox = Outbox()
        handle = Handle(asyncio.get_running_loop(), lambda: None, outbox)
        chunks = handle.token_chunks()

        handle._emit([5])  # the decode thread's side: delivered at the flush
        outbox.flush()
        assert await anext(chunks) == (5,)  # kept up: one step's token

        for step in ([6], [7, 8], [9]):  # three steps while the consumer was busy
            handle._emit(step)
            outbox.flush()
        await asyncio.sleep(0)  # the loop runs the delivered callbacks
        assert await anext(chunks) == (6, 7, 8, 9)

        handle._emit([10])
        handle._settle(RequestCancelledError("cancelled"))
        outbox.flush()
        assert [c async for c in chunks] == [(10,)]  # the last tokens, then the end
        with pytest.raises(RequestCancelledError):
            await handle.result()

    asyncio.run(main())


def test_tokens_flattens_the_chunks() -> None:
    async def main() -> None:
        outbox = Outbox()
        handle = Handle(asyncio.get_running_loop(), lambda: None, outbox)
        handle._emit([1, 2])
        handle._emit([3])
        handle._settle(RequestCancelledError("cancelled"))
        outbox.flush()
        assert [t async for t in handle.tokens()] == [1, 2, 3]

    asyncio.run(main())
