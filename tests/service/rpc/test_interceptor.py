"""service.rpc.interceptor: every call counted once, under the code its client saw.

A real grpc.aio server on a loopback port with the counter installed as the server installs it,
and a real client in the same event loop. The servicer is a stand-in whose every call does what
the test asks (answer, fail, wait), as the counter must count whatever a servicer does; the real
servicer under the real server is reconciled with its clients in tests/service/test_metrics_consistency.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.metrics import Metrics
from service.rpc.interceptor import (
    DEADLINE_SLACK_RATIO,
    DEADLINE_SLACK_S,
    NO_MESSAGE,
    CallCounter,
    client_deadline,
)
from service.server import SERVICE, add_translator

GET_MODEL_INFO = f"/{SERVICE}/GetModelInfo"
MESSAGE_LIMIT = 1024


def test_the_clients_deadline_is_the_servers_less_the_slack() -> None:
    assert client_deadline(None, 100.0) is None
    assert client_deadline(2.0, 100.0) == pytest.approx(102.0 - DEADLINE_SLACK_S - DEADLINE_SLACK_RATIO * 2.0)
    # gRPC's rounding of a 23.45 s timeout up to 23.5 s fits in the slack
    assert client_deadline(23.5, 0.0) <= 23.45  # type: ignore[operator]


class StandIn(pb_grpc.TranslatorServicer):
    """Every call does what its `do` metadata says: `ok`, `not-found` (abort), `raise` (a bare
    error), `wait` (until the client gives up: `waiting` gets one item as it starts). `remaining`:
    each call's time remaining, as its handler saw it; `counter`: the server's, once serving."""

    def __init__(self) -> None:
        self.waiting: asyncio.Queue[None] = asyncio.Queue()
        self.remaining: list[float | None] = []
        self.counter: CallCounter

    async def _act(self, context: grpc.aio.ServicerContext) -> None:
        self.remaining.append(context.time_remaining())
        do = dict(context.invocation_metadata() or ()).get("do", "ok")
        if do == "not-found":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        if do == "raise":
            raise RuntimeError("a bug")
        if do == "wait":
            await self.waiting.put(None)
            await asyncio.Event().wait()

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        await self._act(context)
        return pb.GetModelInfoResponse(default_model="m")

    async def Translate(self, request: Any, context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        await self._act(context)
        return pb.TranslateResponse(model="m")

    async def TranslateStream(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        yield pb.TranslateStreamResponse(delta=pb.TextDelta(text="a"))
        await self._act(context)
        yield pb.TranslateStreamResponse(delta=pb.TextDelta(text="b"))


Scenario = Callable[[grpc.aio.Channel, StandIn, Callable[[], Counter[tuple[str, str]]]], Awaitable[None]]


def serve(scenario: Scenario, **server: Any) -> None:
    """Run `scenario(channel, servicer, counted)` against a counted server (`server`: options of
    grpc.aio.server); `counted()` is translator_requests_total by (rpc, code), zeros left out."""

    async def main() -> None:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        options = [("grpc.max_receive_message_length", MESSAGE_LIMIT)]
        servicer = StandIn()
        servicer.counter = CallCounter(metrics, SERVICE)
        aio = grpc.aio.server(interceptors=[servicer.counter], options=options, **server)
        add_translator(servicer, aio)  # type: ignore[arg-type]
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), aio)
        port = aio.add_insecure_port("127.0.0.1:0")
        await aio.start()

        def counted() -> Counter[tuple[str, str]]:
            values = Counter[tuple[str, str]]()
            for sample in next(m for m in registry.collect() if m.name == "translator_requests").samples:
                if sample.name == "translator_requests_total" and sample.value:
                    values[sample.labels["rpc"], sample.labels["code"]] = int(sample.value)
            return values

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(channel, servicer, counted)
        finally:
            await aio.stop(None)

    asyncio.run(main())


async def code_of(call: Awaitable[Any]) -> str:
    try:
        await call
    except grpc.RpcError as err:
        return err.code().name  # type: ignore[no-any-return,attr-defined]
    except asyncio.CancelledError:
        return "CANCELLED"  # the client's own cancellation
    return "OK"


async def settled(
    counted: Callable[[], Counter[tuple[str, str]]], expected: dict[tuple[str, str], int]
) -> None:
    """Wait until the counts are `expected` (a call that gRPC ended is counted as the server sees
    its end, a moment after the client does), up to 30 s; then they must be."""
    for _ in range(3000):
        if counted() == expected:
            return
        await asyncio.sleep(0.01)
    assert counted() == expected


def stub(channel: grpc.aio.Channel) -> pb_grpc.TranslatorStub:
    return pb_grpc.TranslatorStub(channel)  # type: ignore[no-untyped-call]


def test_calls_that_reach_the_handler_are_counted_as_their_client_saw_them() -> None:
    async def scenario(
        channel: grpc.aio.Channel, servicer: StandIn, counted: Callable[[], Counter[tuple[str, str]]]
    ) -> None:
        translator, seen = stub(channel), Counter[tuple[str, str]]()

        async def ended(rpc: str, call: Awaitable[Any]) -> str:
            code = await code_of(call)
            seen[rpc, code] += 1
            return code

        request, info = pb.TranslateRequest(texts=["a"]), pb.GetModelInfoRequest()
        # answered by the handler: counted before the client has its status
        assert await ended("Translate", translator.Translate(request, timeout=10)) == "OK"
        assert counted() == seen
        not_found = translator.GetModelInfo(info, metadata=(("do", "not-found"),), timeout=10)
        assert await ended("GetModelInfo", not_found) == "NOT_FOUND"
        assert counted() == seen
        stream = translator.TranslateStream(pb.TranslateStreamRequest(text="a"), timeout=10)
        assert await ended("TranslateStream", _drain(stream)) == "OK"
        assert counted() == seen
        # a bare error: gRPC answers UNKNOWN
        raising = translator.Translate(request, metadata=(("do", "raise"),), timeout=10)
        assert await ended("Translate", raising) == "UNKNOWN"
        # ended by gRPC: the client's cancellation, the deadline (non-round: gRPC rounds its timeout
        # up, and the client's cancellation at its own deadline reaches the server first)
        waiting = translator.Translate(request, metadata=(("do", "wait"),), timeout=30)
        await servicer.waiting.get()
        waiting.cancel()
        assert await ended("Translate", waiting) == "CANCELLED"
        for timeout in (0.3, 1.2345):
            expiring = translator.Translate(request, metadata=(("do", "wait"),), timeout=timeout)
            assert await ended("Translate", expiring) == "DEADLINE_EXCEEDED"
        streaming = translator.TranslateStream(
            pb.TranslateStreamRequest(text="a"), metadata=(("do", "wait"),), timeout=30
        )
        await streaming.read()  # the first message: its handler waits in the middle of the stream
        await servicer.waiting.get()
        streaming.cancel()
        assert await ended("TranslateStream", streaming.read()) == "CANCELLED"
        await settled(counted, seen)

    serve(scenario)


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


def test_calls_grpc_ends_before_any_handler_are_counted() -> None:
    async def scenario(
        channel: grpc.aio.Channel, servicer: StandIn, counted: Callable[[], Counter[tuple[str, str]]]
    ) -> None:
        translator = stub(channel)
        request = pb.TranslateRequest(texts=["a" * 2 * MESSAGE_LIMIT])
        # a message over the server's limit: gRPC refuses it and drops it
        assert await code_of(translator.Translate(request, timeout=10)) == "RESOURCE_EXHAUSTED"
        # a request stream that ends with no message (HEADERS, then END_STREAM)
        no_message = channel.stream_unary(GET_MODEL_INFO)(_nothing(), timeout=10)
        try:
            await no_message
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == NO_MESSAGE  # type: ignore[attr-defined]
        # over maximum_concurrent_rpcs: gRPC answers before any handler
        held = translator.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("do", "wait"),), timeout=30)
        await servicer.waiting.get()
        assert (
            await code_of(translator.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))
            == "RESOURCE_EXHAUSTED"
        )
        held.cancel()
        assert await code_of(held) == "CANCELLED"
        expected = {
            ("Translate", "RESOURCE_EXHAUSTED"): 1,
            ("GetModelInfo", "INVALID_ARGUMENT"): 1,
            ("GetModelInfo", "RESOURCE_EXHAUSTED"): 1,
            ("GetModelInfo", "CANCELLED"): 1,
        }
        await settled(counted, expected)

    serve(scenario, maximum_concurrent_rpcs=1)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


def test_other_services_and_unknown_methods_are_not_counted() -> None:
    async def scenario(
        channel: grpc.aio.Channel, servicer: StandIn, counted: Callable[[], Counter[tuple[str, str]]]
    ) -> None:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)  # type: ignore[no-untyped-call]
        assert (await check).status == health_pb2.HealthCheckResponse.SERVING
        unknown = channel.unary_unary(f"/{SERVICE}/Retranslate")(b"", timeout=10)
        assert await code_of(unknown) == "UNIMPLEMENTED"
        assert await code_of(stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)) == "OK"
        assert counted() == {("GetModelInfo", "OK"): 1}  # the only call of a counted RPC

    serve(scenario)


def test_the_handler_sees_the_time_its_client_has_left() -> None:
    async def scenario(
        channel: grpc.aio.Channel, servicer: StandIn, counted: Callable[[], Counter[tuple[str, str]]]
    ) -> None:
        translator = stub(channel)
        assert await code_of(translator.GetModelInfo(pb.GetModelInfoRequest(), timeout=2.0)) == "OK"
        (remaining,) = servicer.remaining
        # gRPC rounds the client's 2 s up by up to 1 % on the wire; the slack takes at least that off
        assert remaining is not None and 1.0 < remaining < 2.0
        assert await code_of(translator.GetModelInfo(pb.GetModelInfoRequest())) == "OK"
        assert servicer.remaining[1] is None  # no deadline

    serve(scenario)


def test_quiet_waits_for_the_calls_in_progress_and_then_for_a_silence() -> None:
    """`CallCounter.quiet`, which a stopping server waits for before closing its connections
    (service/server.py): never while a call is in progress, then only once none has started or
    ended for the time asked; False at `until` if calls go on."""

    async def scenario(
        channel: grpc.aio.Channel, servicer: StandIn, counted: Callable[[], Counter[tuple[str, str]]]
    ) -> None:
        translator, counter, silence = stub(channel), servicer.counter, 0.3
        request = pb.TranslateRequest(texts=["a"])
        first, second = (translator.Translate(request, metadata=(("do", "wait"),)) for _ in range(2))
        for _ in range(2):
            await servicer.waiting.get()
        assert not await counter.quiet(0.0, until=time.monotonic() + 0.2)  # in progress till `until`
        quiet = asyncio.create_task(counter.quiet(silence, until=time.monotonic() + 60))
        first.cancel()
        assert await code_of(first) == "CANCELLED"
        await asyncio.sleep(silence)
        assert not quiet.done()  # the second call is still in progress
        cancelled = time.monotonic()  # the last call ends after this, in the server
        second.cancel()
        assert await code_of(second) == "CANCELLED"
        assert await quiet
        assert time.monotonic() - cancelled >= silence
        await settled(counted, {("Translate", "CANCELLED"): 2})

    serve(scenario)
