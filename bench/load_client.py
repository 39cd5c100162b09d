"""The load generator of `bench.load`: grpc.aio clients against a running server, and their figures.

`run_phase` runs one phase to completion in a process of its own (`bench.load` calls it through a
process pool), so that the clients never share the server's interpreter, GIL or event loop, which
real clients would not (docs/measured-choices.md has what sharing cost).

Every request is one text, greedy, with `return_timings`. Most are unary `Translate` calls; every
`stream_every`-th request (by arrival index) is a `TranslateStream` call instead, and only those give
the client-side time to first token (the first delta that carries token ids). With
`texts_per_call` > 1 every request is a unary `Translate` of that many consecutive texts (a client
translating a paragraph): it shows what the per-call work of gRPC costs. Latency is measured by
the client from just before the call to the full result (for a stream: the final message).

A phase opens `connections` channels, each its own TCP connection, and spreads its requests over
them round-robin: a closed loop's client i always uses channel i mod `connections`, an open loop's
and a warm-up's request i goes on channel i mod `connections`. A server of several worker
processes (`python -m service --workers N`) gets each connection on one worker (the kernel picks
it), so one connection would load one worker only; every server gets the same spread, so that the
comparisons stay like for like.

- Closed loop (`closed_loop`): N clients, each sending its next request as soon as its previous one
  returns, until the duration has passed; the requests in flight then finish and count.
- Open loop (`open_loop`): Poisson arrivals at a given rate (exponential gaps, seeded) for the
  duration, each sent whether or not earlier ones have returned; then the stragglers get `drain_s`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import grpc
import numpy as np

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc

_OPTIONS = pb.TranslateOptions(greedy=pb.Greedy(), return_timings=True)
# A channel's own TCP connection: channels to one target otherwise share one (gRPC's global
# subchannel pool), and their calls would all land on one worker process.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# As many as the largest closed loop has clients: each client then has a connection of its own, as
# separate clients would, and a worker-process server gets about as many clients per worker as the
# kernel's random choice allows (fewer connections split unevenly: docs/measured-choices.md).
# Unused channels never connect.
DEFAULT_CONNECTIONS = 64


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it."""

    sent: float  # seconds since the phase began
    latency: float  # seconds, call to full result
    output_tokens: int  # Translation.output_tokens (end token included), summed over the call's texts
    streamed: bool
    ttft: float | None  # client-side time to the first token, streamed requests only
    server_ttft: float | None  # Timings.time_to_first_token_seconds (server clock, from arrival)
    error: str | None  # the gRPC status name of a failed call
    texts: int = 1  # texts the call carried


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        p50, p90, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])
        return cls(float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class PhaseResult:
    """The figures of one mode under one load."""

    mode: str  # continuous, collect, batch1
    load: str  # "closed" or "open"
    clients: int  # closed loop: concurrent clients; open loop: 0
    offered_rate: float  # open loop: arrivals/s asked for; closed loop: 0
    seconds: float  # from the first request sent to the last one returned
    requests: int  # succeeded
    errors: int  # failed (any status)
    unfinished: int  # open loop: still running when the drain time ran out (cancelled)
    streamed: int  # succeeded streamed requests (the TTFT sample)
    sentences_per_s: float
    output_tokens_per_s: float
    mean_output_tokens: float
    latency: Percentiles | None  # seconds, all succeeded requests
    ttft: Percentiles | None  # seconds, client side, streamed requests
    server_ttft: Percentiles | None  # seconds, server side, all succeeded requests
    texts_per_call: int = 1
    error_codes: dict[str, int] = dataclasses.field(default_factory=dict)  # failed calls by status
    server_cores: float | None = None  # the server process's CPU seconds per second of the phase
    client_cores: float | None = None  # the load generator's, likewise
    # closed loops of continuous batching: the engine alone's output tok/s at its best setting,
    # measured right after the loop (the machine's speed drifts; this pair saw about the same one)
    engine_after: float | None = None
    repeat: int = 0  # open loop: which run at this rate (they alternate between the modes)
    workers: int = 1  # the server's worker processes (`python -m service --workers`); 1: one process


class Caller:
    """Sends request number i: text i (cycling over `texts`), streamed when i % stream_every == 0;
    with `texts_per_call` k > 1, texts k·i … k·i + k − 1 in one unary call. It goes on channel
    `connection` mod len(channels), by default i's: which channel never changes what is sent."""

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        texts: Sequence[str],
        stream_every: int,
        timeout_s: float = 120.0,
        texts_per_call: int = 1,
    ) -> None:
        if not texts:
            raise ValueError("no texts to send")
        if not channels:
            raise ValueError("no channel to send on")
        self._stubs = [pb_grpc.TranslatorStub(channel) for channel in channels]
        self._texts, self._stream_every, self._timeout = texts, stream_every, timeout_s
        self.texts_per_call = texts_per_call
        self._origin = time.perf_counter()

    def restart_clock(self) -> None:
        self._origin = time.perf_counter()

    async def call(self, index: int, connection: int | None = None) -> Sample:
        stub = self._stubs[(index if connection is None else connection) % len(self._stubs)]
        k = self.texts_per_call
        texts = [self._texts[(index * k + j) % len(self._texts)] for j in range(k)]
        text = texts[0]
        streamed = k == 1 and self._stream_every > 0 and index % self._stream_every == 0
        start = time.perf_counter()
        ttft: float | None = None
        try:
            if streamed:
                final = None
                stream = stub.TranslateStream(
                    pb.TranslateStreamRequest(text=text, options=_OPTIONS), timeout=self._timeout
                )
                async for message in stream:
                    if ttft is None and message.HasField("delta") and message.delta.token_ids:
                        ttft = time.perf_counter() - start
                    if message.HasField("final"):
                        final = message.final
                if final is None:
                    raise RuntimeError("the stream ended without a final message")
                response = final
            else:
                response = await stub.Translate(
                    pb.TranslateRequest(texts=texts, options=_OPTIONS), timeout=self._timeout
                )
        except grpc.aio.AioRpcError as err:
            return Sample(
                start - self._origin, time.perf_counter() - start, 0, streamed, None, None, err.code().name, k
            )
        latency = time.perf_counter() - start
        first = response.translations[0]
        server_ttft = first.timings.time_to_first_token_seconds if first.HasField("timings") else None
        tokens = sum(t.output_tokens for t in response.translations)
        return Sample(start - self._origin, latency, tokens, streamed, ttft, server_ttft, None, k)


async def warm_up(caller: Caller, requests: int, concurrency: int) -> None:
    """Untimed requests (streamed ones included), `concurrency` at a time, to fill caches and pools;
    request i on channel i, so that every connection, and the worker it landed on, gets some."""
    counter = itertools.count()

    async def client() -> None:
        while (index := next(counter)) < requests:
            await caller.call(index)

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def closed_loop(caller: Caller, mode: str, clients: int, duration_s: float) -> PhaseResult:
    """`clients` concurrent clients, back to back, for `duration_s`; client c always on channel c."""
    counter = itertools.count()
    samples: list[Sample] = []
    caller.restart_clock()
    start = time.perf_counter()
    deadline = start + duration_s

    async def client(number: int) -> None:
        while time.perf_counter() < deadline:
            samples.append(await caller.call(next(counter), connection=number))

    await asyncio.gather(*(client(number) for number in range(clients)))
    elapsed = time.perf_counter() - start
    return summarize(mode, "closed", samples, elapsed, clients=clients)


async def open_loop(
    caller: Caller, mode: str, rate: float, duration_s: float, *, seed: int = 0, drain_s: float = 30.0
) -> PhaseResult:
    """Poisson arrivals at `rate` per second for `duration_s`; stragglers get `drain_s` more. Request i
    goes on channel i: the arrivals are not tied to clients."""
    samples, elapsed, unfinished = await open_loop_samples(
        caller, rate, duration_s, seed=seed, drain_s=drain_s
    )
    return summarize(mode, "open", samples, elapsed, offered_rate=rate, unfinished=unfinished)


async def open_loop_samples(
    caller: Caller, rate: float, duration_s: float, *, seed: int = 0, drain_s: float = 30.0
) -> tuple[list[Sample], float, int]:
    """`open_loop`'s requests: (every sample, seconds from the start to the last one's end, requests
    still running when the drain time ran out)."""
    if rate <= 0:
        raise ValueError(f"the arrival rate must be positive, not {rate}")
    rng = random.Random(seed)
    samples: list[Sample] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(index: int) -> None:
        samples.append(await caller.call(index))

    caller.restart_clock()
    start = time.perf_counter()
    arrival = 0.0
    for index in itertools.count():
        arrival += rng.expovariate(rate)
        if arrival >= duration_s:
            break
        delay = start + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    unfinished = 0
    if tasks:
        _, pending = await asyncio.wait(
            tasks, timeout=drain_s + max(0.0, start + duration_s - time.perf_counter())
        )
        unfinished = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return samples, time.perf_counter() - start, unfinished


def summarize(
    mode: str,
    load: str,
    samples: Sequence[Sample],
    seconds: float,
    *,
    clients: int = 0,
    offered_rate: float = 0.0,
    unfinished: int = 0,
) -> PhaseResult:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.output_tokens for s in ok)
    texts = sum(s.texts for s in ok)
    seconds = max(seconds, 1e-9)
    return PhaseResult(
        mode=mode,
        load=load,
        clients=clients,
        offered_rate=offered_rate,
        seconds=seconds,
        requests=len(ok),
        errors=len(samples) - len(ok),
        unfinished=unfinished,
        streamed=sum(s.streamed for s in ok),
        sentences_per_s=texts / seconds,
        output_tokens_per_s=tokens / seconds,
        mean_output_tokens=tokens / texts if texts else 0.0,
        latency=Percentiles.of([s.latency for s in ok]),
        ttft=Percentiles.of([s.ttft for s in ok if s.ttft is not None]),
        server_ttft=Percentiles.of([s.server_ttft for s in ok if s.server_ttft is not None]),
        error_codes=dict(collections.Counter(s.error for s in samples if s.error is not None)),
    )


Phase = Literal["warm", "closed", "open"]


def run_phase(
    target: str,
    texts: Sequence[str],
    stream_every: int,
    phase: Phase,
    mode: str,
    *,
    clients: int = 0,
    rate: float = 0.0,
    duration_s: float = 0.0,
    requests: int = 0,
    seed: int = 0,
    texts_per_call: int = 1,
    connections: int = DEFAULT_CONNECTIONS,
) -> PhaseResult | None:
    """One phase against the server at `target`, on `connections` fresh connections and a fresh event
    loop (a child process's entry point): `warm` sends `requests` untimed calls `clients` at a time
    and returns None."""
    if connections < 1:
        raise ValueError(f"a phase needs at least one connection, not {connections}")

    async def run() -> PhaseResult | None:
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(grpc.aio.insecure_channel(target, options=OWN_CONNECTION))
                for _ in range(connections)
            ]
            caller = Caller(channels, texts, stream_every, texts_per_call=texts_per_call)
            if phase == "warm":
                await warm_up(caller, requests, clients)
                return None
            if phase == "closed":
                return await closed_loop(caller, mode, clients, duration_s)
            return await open_loop(caller, mode, rate, duration_s, seed=seed)

    cpu, wall = time.process_time(), time.perf_counter()
    result = asyncio.run(run())
    if result is None:
        return None
    cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return dataclasses.replace(result, client_cores=cores, texts_per_call=texts_per_call)
