"""The soak's load generator: a mixed closed loop with bursts, every call's outcome kept by (rpc, code).

`mixed_load` runs in a process of its own (`bench.soak` calls it through a process pool), so that the
clients never share the server's interpreter. `clients` callers, each on a connection of its own,
send one call after another for `duration_s`, each call a kind drawn (seeded) from `KINDS`; every
`burst_every_s` a burst of `burst_calls` eight-text calls goes out at once, beyond what the server
can queue in `--max-queue-wait-s`, so that admission refuses some.

Every kind is built so that its client and the server cannot disagree on its code, which the soak
reconciles exactly: a call meant to expire asks for far more decoding than its deadline (`EXPIRE_S`)
allows, and that deadline is long enough for the call to reach the server (a call that expires, or is
cancelled, before it leaves its client is never seen there); a call meant to be cancelled is a stream
cancelled once its first tokens have arrived, with 120 steps or more to go; every other call gets a
deadline (`CALL_DEADLINE_S`) far beyond the longest wait admission lets it in for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from bench.load_client import OWN_CONNECTION
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc

CALL_DEADLINE_S = 60.0  # every call not meant to expire: 12× --max-queue-wait-s, the longest wait admitted
DRAIN_S = 2 * CALL_DEADLINE_S  # after the duration, how long the calls still running may take
# A decode far longer than any EXPIRE_S deadline (8 texts × 8 beams × 120+ steps: about a second on
# 2 cores) and than a cancellation takes to arrive (120+ steps after the first).
LONG = pb.StoppingCriteria(min_output_tokens=120, max_output_tokens=128)
# The deadlines of the calls meant to expire: long enough for the call to reach the server (one that
# expires in the client before it is sent is never seen there), far shorter than a LONG decode.
EXPIRE_S = (0.15, 0.3)
# (kind, weight): what a caller's next call is
KINDS = (
    ("translate", 40),  # unary Translate of 1–8 texts
    ("stream", 15),  # TranslateStream of one text
    ("attend", 10),  # Attend of one text
    ("expire", 10),  # an EXPIRE_S deadline on a LONG decode: DEADLINE_EXCEEDED
    ("cancel", 10),  # a stream cancelled by its client mid-decode: CANCELLED
    ("invalid", 15),  # INVALID_ARGUMENT or NOT_FOUND
)
INVALID: tuple[Callable[[str], pb.TranslateRequest | pb.TranslateStreamRequest | pb.AttendRequest], ...] = (
    lambda text: pb.TranslateRequest(texts=[]),
    lambda text: pb.TranslateRequest(texts=["cat " * 400]),  # one sentence over 128 tokens
    lambda text: pb.TranslateRequest(texts=[text], options=_beam(99)),
    lambda text: pb.TranslateRequest(texts=[text], options=pb.TranslateOptions(model="nope")),  # NOT_FOUND
    lambda text: pb.TranslateStreamRequest(text=text, options=_beam(4)),  # a stream cannot beam search
    lambda text: pb.AttendRequest(source=""),
)


_RPC = {
    pb.TranslateRequest: "Translate",
    pb.TranslateStreamRequest: "TranslateStream",
    pb.AttendRequest: "Attend",
}


def _beam(size: int) -> pb.TranslateOptions:
    return pb.TranslateOptions(beam=pb.BeamSearch(beam_size=size))


@dataclass
class LoadOutcome:
    """What the clients saw: calls by (rpc, status name), and the figures the soak reports."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    sent: int = 0  # calls started
    ended: int = 0  # calls that got an outcome (a status, OK included)
    texts_ok: int = 0  # texts translated (Translate and TranslateStream calls that succeeded)
    refusal_s: list[float] = field(default_factory=list)  # client-side latency of RESOURCE_EXHAUSTED
    bursts: int = 0
    cancel_within_s: float = 0.0  # the calibrated bound of a safe cancellation (_Soak.calibrate)
    cancels_skipped: int = 0  # "cancel" streams read too late to cancel safely: read to their end
    seconds: float = 0.0  # from the first call to the last outcome
    surprises: list[str] = field(default_factory=list)  # the first few unexpected statuses, with details

    @property
    def lost(self) -> int:
        """Calls sent that never got an outcome."""
        return self.sent - self.ended


class _Soak:
    def __init__(self, stubs: Sequence[pb_grpc.TranslatorAsyncStub], texts: Sequence[str], seed: int) -> None:
        self.stubs, self.texts, self.rng = stubs, texts, random.Random(seed)
        self.outcome = LoadOutcome()
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.cancel_within_s = 0.0  # set by calibrate()

    def text(self) -> str:
        return self.rng.choice(self.texts)

    async def record(self, rpc: str, call: Callable[[], Awaitable[int]]) -> None:
        """Run `call` (returning the texts it translated) and count its outcome under `rpc`."""
        self.outcome.sent += 1
        start = time.perf_counter()
        try:
            texts = await call()
            code, details = "OK", ""
        except grpc.aio.AioRpcError as err:
            texts, code, details = 0, err.code().name, err.details() or ""
        self._counts[(rpc, code)] += 1
        self.outcome.ended += 1
        self.outcome.texts_ok += texts
        if code == "RESOURCE_EXHAUSTED":
            self.outcome.refusal_s.append(time.perf_counter() - start)
        if code in ("UNKNOWN", "INTERNAL", "UNAVAILABLE") and len(self.outcome.surprises) < 20:
            self.outcome.surprises.append(f"{rpc} {code}: {details}")

    async def one(self, stub: pb_grpc.TranslatorAsyncStub, kind: str) -> None:
        text, rng = self.text(), self.rng
        if kind == "translate":
            texts = [self.text() for _ in range(rng.randint(1, 8))]

            async def translate() -> int:
                reply = await stub.Translate(pb.TranslateRequest(texts=texts), timeout=CALL_DEADLINE_S)
                return len(reply.translations)

            await self.record("Translate", translate)
        elif kind == "stream":

            async def stream() -> int:
                request = pb.TranslateStreamRequest(text=text)
                async for _ in stub.TranslateStream(request, timeout=CALL_DEADLINE_S):
                    pass
                return 1

            await self.record("TranslateStream", stream)
        elif kind == "attend":

            async def attend() -> int:
                await stub.Attend(pb.AttendRequest(source=text), timeout=CALL_DEADLINE_S)
                return 0

            await self.record("Attend", attend)
        elif kind == "expire":
            deadline = rng.uniform(*EXPIRE_S)
            options = pb.TranslateOptions(stopping=LONG, beam=pb.BeamSearch(beam_size=8))
            texts = [self.text() for _ in range(8)]

            async def expire() -> int:
                request = pb.TranslateRequest(texts=texts, options=options)
                await stub.Translate(request, timeout=deadline)
                return 1

            await self.record("Translate", expire)
        elif kind == "cancel":
            await self._cancelled_stream(stub, text)
        else:
            request = rng.choice(INVALID)(text)

            async def invalid() -> int:
                if isinstance(request, pb.TranslateRequest):
                    await stub.Translate(request, timeout=CALL_DEADLINE_S)
                elif isinstance(request, pb.AttendRequest):
                    await stub.Attend(request, timeout=CALL_DEADLINE_S)
                else:
                    async for _ in stub.TranslateStream(request, timeout=CALL_DEADLINE_S):
                        pass
                return 0

            await self.record(_RPC[type(request)], invalid)

    async def _cancelled_stream(self, stub: pb_grpc.TranslatorAsyncStub, text: str) -> None:
        """A LONG stream cancelled as soon as its first message (the first tokens) is read, if that
        is soon enough after the call began (`cancel_within_s`) that the server cannot have finished
        it: a client read late (its event loop busy) would cancel a call the server has already
        answered OK. Read late, the stream is read to its end instead (`LoadOutcome.cancels_skipped`)."""

        async def cancelled() -> int:
            request = pb.TranslateStreamRequest(text=text, options=pb.TranslateOptions(stopping=LONG))
            start = time.perf_counter()
            call = stub.TranslateStream(request, timeout=CALL_DEADLINE_S)
            await call.read()  # decoding, 120 steps or more to go
            if time.perf_counter() - start < self.cancel_within_s:
                call.cancel()
            else:
                self.outcome.cancels_skipped += 1
                while await call.read() is not grpc.aio.EOF:  # (read() and iterating do not mix)
                    pass
            code = await call.code()  # CANCELLED, or whatever else the call ended with
            if code != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(
                    code, grpc.aio.Metadata(), grpc.aio.Metadata(), await call.details()
                )
            return 1

        await self.record("TranslateStream", cancelled)

    async def calibrate(self, stub: pb_grpc.TranslatorAsyncStub) -> None:
        """`cancel_within_s`: half the time of the fastest of three LONG streams alone (a decode is
        never faster than alone on an idle server)."""
        times = []
        for _ in range(3):
            start = time.perf_counter()
            request = pb.TranslateStreamRequest(text=self.text(), options=pb.TranslateOptions(stopping=LONG))

            async def alone(request: pb.TranslateStreamRequest = request) -> int:
                async for _ in stub.TranslateStream(request, timeout=CALL_DEADLINE_S):
                    pass
                return 1

            await self.record("TranslateStream", alone)
            times.append(time.perf_counter() - start)
        self.cancel_within_s = self.outcome.cancel_within_s = min(times) / 2

    def finish(self) -> LoadOutcome:
        self.outcome.counts = dict(self._counts)
        return self.outcome


async def _mixed(
    target: str,
    texts: Sequence[str],
    *,
    duration_s: float,
    clients: int,
    burst_every_s: float,
    burst_calls: int,
    seed: int,
) -> LoadOutcome:
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(target, options=OWN_CONNECTION))
            for _ in range(max(clients, 8))
        ]
        stubs = [pb_grpc.TranslatorStub(channel) for channel in channels]
        soak = _Soak(stubs, texts, seed)
        kinds, weights = zip(*KINDS, strict=True)
        start = time.perf_counter()
        await soak.calibrate(stubs[0])
        end = start + duration_s
        bursts: list[asyncio.Task[None]] = []

        async def caller(number: int) -> None:
            while time.perf_counter() < end:
                await soak.one(stubs[number], soak.rng.choices(kinds, weights)[0])

        async def burster() -> None:
            while (
                wait := start + (soak.outcome.bursts + 1) * burst_every_s - time.perf_counter()
            ) < end - start:
                await asyncio.sleep(max(0.0, wait))
                if time.perf_counter() >= end:
                    return
                soak.outcome.bursts += 1
                for i in range(burst_calls):
                    texts_8 = [soak.text() for _ in range(8)]
                    stub = stubs[i % len(stubs)]

                    async def burst(
                        texts: list[str] = texts_8, stub: pb_grpc.TranslatorAsyncStub = stub
                    ) -> int:
                        reply = await stub.Translate(
                            pb.TranslateRequest(texts=texts), timeout=CALL_DEADLINE_S
                        )
                        return len(reply.translations)

                    bursts.append(asyncio.create_task(soak.record("Translate", burst)))

        callers = [asyncio.create_task(caller(n)) for n in range(clients)]
        callers.append(asyncio.create_task(burster()))
        await asyncio.wait(callers, timeout=duration_s + DRAIN_S)
        if bursts:
            await asyncio.wait(bursts, timeout=max(1.0, start + duration_s + DRAIN_S - time.perf_counter()))
        running = [t for t in [*callers, *bursts] if not t.done()]
        for task in running:  # lost: they count as sent and not ended
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for task in [*callers, *bursts]:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a bug of the soak, not an outcome
        soak.outcome.seconds = time.perf_counter() - start
        return soak.finish()


def mixed_load(
    target: str,
    texts: Sequence[str],
    *,
    duration_s: float,
    clients: int,
    burst_every_s: float,
    burst_calls: int,
    seed: int = 0,
) -> LoadOutcome:
    """The mixed load against the server at `target` for `duration_s`, then every call still running
    gets up to DRAIN_S (a child process's entry point)."""
    return asyncio.run(
        _mixed(
            target,
            list(texts),
            duration_s=duration_s,
            clients=clients,
            burst_every_s=burst_every_s,
            burst_calls=burst_calls,
            seed=seed,
        )
    )
