"""The scheduler: outputs equal each sentence decoded alone, whatever joins or leaves; outcomes and limits.

A fake engine (pure numpy: log-probs from a hash of source and prefix; its "cache" holds the
tokens themselves, so every row edit of the scheduler is checked) runs the fast unit tests; the
real engine on models/en-fr-small runs the staggered-arrival identity tests, in both modes.
pytest-asyncio is not installed: each test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.config import SchedulerConfig
from service.decoding import Hypothesis, SearchOptions, start_search
from service.engine.kv_cache import KV, KVCache
from service.engine.reference_decoder import Prefixes, run_search
from service.metrics import Metrics
from service.scheduler import (
    DeadlineExceededError,
    FinishReason,
    Generation,
    Handle,
    QueueFullError,
    Request,
    RequestCancelledError,
    RequestTooLargeError,
    Scheduler,
    SchedulerClosedError,
    StepFailedError,
)

MODEL_DIR = Path("models/en-fr-small")
PAD, BOS, EOS, VOCAB = 0, 1, 2, 12
ENDLESS = 3  # a source starting with it never produces the end token

# --- a fake engine ---------------------------------------------------------------------------------


def fake_log_probs(source: Sequence[int], prefix: Sequence[int]) -> np.ndarray:
    """Deterministic log-probabilities (V,) of the token after `prefix` (start token first)."""
    key = (tuple(int(t) for t in source), tuple(int(t) for t in prefix))
    digest = hashlib.sha256(repr(key).encode()).digest()
    logits = np.random.default_rng(int.from_bytes(digest[:8], "little")).normal(size=VOCAB)
    logits[EOS] += 0.4 * len(prefix) - 1.0  # the end gets likelier with length
    if key[0][0] == ENDLESS:
        logits[EOS] = -30.0  # runs to its length limit: for cancel / deadline tests
    logits -= logits.max()
    return (logits - np.log(np.exp(logits).sum())).astype(np.float32)


class StepHold:
    """Holds an engine's decoder steps for a test: after `after(n)`, each decode thread's steps past
    its first n wait until the limit is raised or `release()`d. What is in flight stays in flight and
    the queue stays as it is (the decode thread is in the held step) while the test looks at them
    or adds to them, however slowly the machine runs the test: no wall-clock window to hit."""

    TIMEOUT_S = 30.0  # a step held longer fails (StepFailedError): the test never let it go

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._limit: int | None = None
        self._taken: Counter[str] = Counter()  # steps begun, by decode thread
        self._held = 0  # decode threads waiting in a held step now

    def after(self, steps: int | None) -> None:
        with self._changed:
            self._limit = steps
            self._changed.notify_all()

    def release(self) -> None:
        self.after(None)

    def wait_turn(self) -> None:
        """The decode thread's side, at the start of each step."""
        thread = threading.current_thread().name
        with self._changed:
            self._held += 1
            self._changed.notify_all()
            try:
                if not self._changed.wait_for(lambda: self._free(thread), timeout=self.TIMEOUT_S):
                    raise RuntimeError(f"a decoder step held for {self.TIMEOUT_S:.0f} s")
            finally:
                self._held -= 1
                self._changed.notify_all()
            self._taken[thread] += 1

    def wait_held(self, threads: int = 1, timeout: float = TIMEOUT_S) -> bool:
        """Until `threads` decode threads wait in a held step (they sweep and admit nothing meanwhile)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._held >= threads and self._limit is not None, timeout)

    def _free(self, thread: str) -> bool:
        return self._limit is None or self._taken[thread] < self._limit

    def wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """`step` (a real engine's), held as this says."""

        def held(*args: Any, **kwargs: Any) -> Any:
            self.wait_turn()
            return step(*args, **kwargs)

        return held


@dataclass(frozen=True)
class _Dims:
    bos_id: int = BOS


@dataclass(frozen=True)
class _Model:
    dims: _Dims = _Dims()


class FakeEngine:
    """The StepEngine protocol over `fake_log_probs`; K holds the tokens (cross: the source)."""

    def __init__(self, names: Sequence[str] = ("fake",), step_delay: float = 0.0) -> None:
        self.models: Mapping[str, _Model] = {n: _Model() for n in names}
        self.step_delay = step_delay
        self.fail_next_steps = 0  # the next this many steps raise
        self.steps: list[tuple[str, int]] = []  # (model, rows) of each step
        self.hold = StepHold()

    def encode(self, model: str | None, sources: Sequence[Sequence[int]]) -> KV:
        width = max(len(s) for s in sources)
        k = np.zeros((1, len(sources), 1, width, 1), np.float32)
        mask = np.zeros((len(sources), width), bool)
        for row, source in enumerate(sources):
            k[0, row, 0, : len(source), 0], mask[row, : len(source)] = source, True
        return KV(k, k.copy(), mask)

    def new_cache(self, model: str | None) -> KVCache:
        return KVCache(1, 1, 1, np.float32, chunk=4)  # a small chunk: capacity changes often

    def step(self, model: str | None, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """What the decoder-step graph does with the cache, over fake_log_probs: each row's past
        slots hold its earlier tokens, its cross slots its source."""
        self.hold.wait_turn()
        self.steps.append((str(model), len(tokens)))
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_next_steps:
            self.fail_next_steps -= 1
            raise RuntimeError("injected step failure")
        assert cache.rows == len(tokens)
        step, physical = cache.step_inputs(), cache.to_physical(tokens)
        out = np.zeros((len(tokens), VOCAB), np.float32)
        for row in range(len(tokens)):
            prefix = [int(t) for t in step.past_k[0, row, 0, step.self_mask[row], 0]] + [int(physical[row])]
            assert len(prefix) - 1 == step.positions[row], (prefix, step.positions[row])
            source = [int(t) for t in step.cross_k[0, row, 0, step.src_mask[row], 0]]
            out[row] = fake_log_probs(source, prefix)
        new = physical.astype(np.float32)[None, :, None, None]  # (L, R, H, Dh)
        cache.record(new, new.copy())
        return cache.to_logical(out)


class _PrefixSteps:
    """run_search's StepSource over fake_log_probs: the sentence decoded alone, without a cache."""

    def __init__(self, sources: Sequence[Sequence[int]]) -> None:
        self.sources, self.prefixes = sources, Prefixes()

    def run(self, sentences: np.ndarray, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        ids = self.prefixes.grow(parents, tokens)
        return np.stack([fake_log_probs(self.sources[s], ids[r]) for r, s in enumerate(sentences)])


def fake_alone(source: Sequence[int], options: SearchOptions) -> list[Hypothesis]:
    return run_search([start_search(options)], _PrefixSteps([source]), BOS)[0]


def options(beam: int = 1, max_out: int = 12, n_best: int | None = None) -> SearchOptions:
    return SearchOptions(max_out, EOS, beam, 1.0, n_best or beam, never_ids=(PAD, BOS))


FAKE_SOURCES = [[5, 9, 11, 2], [7, 8, 3, 4, 10, 6, 2], [11, 2], [6, 6, 10, 3, 2], [4, 2], [3, 8, 7, 6, 2]]


# --- helpers ---------------------------------------------------------------------------------------


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), timeout=60))  # type: ignore[arg-type]


async def wait_for_steps(scheduler: Scheduler, steps: int) -> None:
    while scheduler.stats().steps < steps:
        await asyncio.sleep(0.001)


async def outcome(handle: Handle) -> Generation | BaseException:
    try:
        return await handle.result()
    except Exception as err:
        return err


def assert_same(got: Sequence[Hypothesis], want: Sequence[Hypothesis], tol: float = 1e-4) -> None:
    assert [h.tokens for h in got] == [h.tokens for h in want]
    assert [h.finished for h in got] == [h.finished for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=tol)


def config(**overrides: Any) -> SchedulerConfig:
    return replace(SchedulerConfig(), **overrides)


# --- identity with the fake engine: staggered arrivals, limits, several models -----------------------


@pytest.mark.parametrize("mode", ["continuous", "collect"])
@pytest.mark.parametrize("beam", [1, 3])
def test_fake_staggered_arrivals_decode_as_if_alone(mode: str, beam: int) -> None:
    async def main() -> None:
        engine = FakeEngine(names=("a", "b"))
        # tight limits: requests wait in the queue for rows to free up
        scheduler = Scheduler(
            engine, config(mode=mode, max_sequences=3 * beam, max_kv_cache_tokens=40 * beam, max_batch_size=2)
        )
        scheduler.start()
        requests = [
            Request("ab"[i % 2], tuple(s), options(beam, max_out=8 + i), stream=True)
            for i, s in enumerate(FAKE_SOURCES * 2)
        ]
        handles: list[Handle] = []
        for i, request in enumerate(requests):
            handles.append(scheduler.submit(request))
            if i % 3 == 2:
                await wait_for_steps(scheduler, scheduler.stats().steps + 2)
        streamed = await asyncio.gather(*(_collect(h) for h in handles))
        for request, handle, tokens in zip(requests, handles, streamed, strict=True):
            generation = await handle.result()
            assert_same(generation.hypotheses, fake_alone(request.source, request.options), tol=1e-6)
            assert tuple(tokens) == generation.hypotheses[0].tokens
        assert max(rows for _, rows in engine.steps) <= 3 * beam
        assert {m for m, _ in engine.steps} == {"a", "b"}
        scheduler.stop()

    run(main)


async def _collect(handle: Handle) -> list[int]:
    return [t async for t in handle.tokens()]


def test_fake_rows_join_the_running_batch_in_continuous_mode() -> None:
    async def main() -> None:
        engine = FakeEngine(step_delay=0.002)
        engine.hold.after(2)  # the first (6 tokens) still decodes when the second comes
        scheduler = Scheduler(engine, config())
        scheduler.start()
        first = scheduler.submit(Request("fake", (9, 8, 7, 6, 5, 4, 3, 2), options(max_out=30)))
        await wait_for_steps(scheduler, 2)
        second = scheduler.submit(Request("fake", (4, 2), options(max_out=30)))
        engine.hold.release()
        await asyncio.gather(first.result(), second.result())
        assert 2 in [rows for _, rows in engine.steps], "the second request never shared a step"
        scheduler.stop()

    run(main)


def _first_step_with(engine: FakeEngine, rows: int) -> int:
    return next(i for i, (_, r) in enumerate(engine.steps) if r >= rows)


def test_a_newcomer_joins_after_at_most_max_admit_delay_steps() -> None:
    async def main() -> None:
        engine = FakeEngine(step_delay=0.01)
        # admit_ratio 2: one waiting row never outweighs the running one; only the delay lets it in
        scheduler = Scheduler(engine, config(admit_ratio=2.0, max_admit_delay_steps=6))
        engine.hold.after(2)  # the first (12 steps) still decodes when the second comes
        scheduler.start()
        first = scheduler.submit(Request("fake", (ENDLESS, 2), options(max_out=12)))
        await wait_for_steps(scheduler, 2)
        second = scheduler.submit(Request("fake", (4, 2), options(max_out=12)))
        late = scheduler.stats().steps + 1  # steps begun by the time it was queued (a slow machine)
        engine.hold.release()
        await asyncio.gather(first.result(), second.result())
        # the first was admitted before step 0, so the next admission comes before step 6, not sooner
        assert 6 <= _first_step_with(engine, 2) <= max(6, late), engine.steps
        scheduler.stop()

    run(main)


def test_newcomers_join_together_once_they_reach_admit_ratio() -> None:
    async def main() -> None:
        engine = FakeEngine(step_delay=0.01)
        scheduler = Scheduler(engine, config(admit_ratio=0.5, max_admit_delay_steps=1000))
        engine.hold.after(2)  # the running four (40 steps) still decode when both late ones come
        scheduler.start()
        running = [scheduler.submit(Request("fake", (ENDLESS, i, 2), options(max_out=40))) for i in range(4)]
        await wait_for_steps(scheduler, 2)
        late = [scheduler.submit(Request("fake", (4, 2), options(max_out=40)))]
        steps = scheduler.stats().steps + 3
        engine.hold.after(steps)
        await wait_for_steps(scheduler, steps)
        assert max(r for _, r in engine.steps) == 4, "one waiting row (< 0.5 × 4 running) joined alone"
        late.append(scheduler.submit(Request("fake", (5, 2), options(max_out=40))))
        engine.hold.release()
        await asyncio.gather(*(h.result() for h in running + late))
        assert 5 not in [r for _, r in engine.steps[: _first_step_with(engine, 6)]], engine.steps
        scheduler.stop()

    run(main)


# --- outcomes -------------------------------------------------------------------------------------


def test_queue_full_fails_fast_and_names_the_limit() -> None:
    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        scheduler = Scheduler(FakeEngine(), config(max_queue_size=2), metrics)  # not started: nothing drains
        scheduler.submit(Request("fake", (4, 2), options()))
        scheduler.submit(Request("fake", (4, 2), options()))
        with pytest.raises(QueueFullError, match="2"):
            scheduler.submit(Request("fake", (4, 2), options()))
        assert (
            metrics.registry.get_sample_value("translator_requests_rejected_total", {"reason": "queue_full"})
            == 1
        )
        scheduler.stop()

    run(main)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_cancelled_waiting_request_frees_its_place_and_the_gauge_at_once() -> None:
    """Not started, so no decode thread sweeps the queue: the places come back at the cancel
    itself, for admission and for the queue-depth gauge; the outcomes follow once it runs."""

    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        scheduler = Scheduler(FakeEngine(), config(max_queue_size=3), metrics)
        cancelled = [scheduler.submit(Request("fake", (4, 2), options())) for _ in range(3)]
        with pytest.raises(QueueFullError):
            scheduler.submit(Request("fake", (4, 2), options()))
        assert _value(metrics, "translator_queue_depth") == 3
        for handle in cancelled:
            handle.cancel()
            handle.cancel()  # a call cancels its texts again as it ends: nothing more happens
        assert scheduler.stats().queued == 0 and _value(metrics, "translator_queue_depth") == 0
        admitted = [scheduler.submit(Request("fake", tuple(s), options())) for s in FAKE_SOURCES[:3]]
        assert scheduler.stats().queued == 3 and _value(metrics, "translator_queue_depth") == 3
        scheduler.start()
        for handle in cancelled:
            with pytest.raises(RequestCancelledError):
                await handle.result()
        for source, handle in zip(FAKE_SOURCES, admitted, strict=False):
            assert_same((await handle.result()).hypotheses, fake_alone(source, options()))
        assert scheduler.stats().outcomes == 6
        assert _value(metrics, "translator_sequences_finished_total", reason="cancelled") == 3
        assert _value(metrics, "translator_requests_rejected_total", reason="queue_full") == 1
        scheduler.stop()

    run(main)


def test_an_expired_waiting_request_gives_its_place_to_a_newcomer_when_the_queue_is_full() -> None:
    async def main() -> None:
        now = [100.0]
        scheduler = Scheduler(FakeEngine(), config(max_queue_size=2), clock=lambda: now[0])
        expiring = scheduler.submit(Request("fake", (4, 2), options(), deadline=101.0))
        waiting = scheduler.submit(Request("fake", (5, 2), options(), deadline=200.0))
        with pytest.raises(QueueFullError):
            scheduler.submit(Request("fake", (6, 2), options()))
        now[0] = 101.0  # the first one's deadline: it no longer counts
        newcomer = scheduler.submit(Request("fake", (6, 2), options()))
        assert scheduler.stats().queued == 2
        scheduler.start()
        with pytest.raises(DeadlineExceededError, match="in the queue"):
            await expiring.result()
        for handle in (waiting, newcomer):
            assert isinstance(await handle.result(), Generation)
        scheduler.stop()

    run(main)


def test_a_request_that_can_never_fit_is_refused_at_submit() -> None:
    async def main() -> None:
        scheduler = Scheduler(FakeEngine(), config(max_sequences=2, max_kv_cache_tokens=30))
        with pytest.raises(RequestTooLargeError, match="max_sequences"):
            scheduler.submit(Request("fake", (4, 2), options(beam=3)))
        with pytest.raises(RequestTooLargeError, match="KV-cache"):
            scheduler.submit(Request("fake", (4, 2), options(beam=2, max_out=16)))
        with pytest.raises(ValueError, match="unknown model"):
            scheduler.submit(Request("nope", (4, 2), options()))

    run(main)


def test_cancel_mid_decode_frees_the_rows() -> None:
    async def main() -> None:
        engine = FakeEngine(step_delay=0.003)
        engine.hold.after(2)  # the victim still decodes when cancelled
        scheduler = Scheduler(engine, config())
        scheduler.start()
        victim = scheduler.submit(Request("fake", (3, 2), options(beam=2, max_out=200), stream=True))
        other = scheduler.submit(Request("fake", (5, 9, 11, 2), options()))
        await wait_for_steps(scheduler, 2)
        victim.cancel()
        engine.hold.release()
        with pytest.raises(RequestCancelledError):
            await victim.result()
        assert _collect_done(victim)
        assert_same((await other.result()).hypotheses, fake_alone((5, 9, 11, 2), options()))
        await _until(lambda: scheduler.stats().in_flight == 0)
        assert scheduler.stats().rows == 0 and scheduler.stats().kv_tokens == 0
        scheduler.stop()

    run(main)


def _collect_done(handle: Handle) -> bool:
    return handle.done()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("mode", ["continuous", "collect"])
def test_a_finished_request_is_freed_without_the_cyclic_garbage_collector(mode: str) -> None:
    """Its handle, ticket, request and result form no reference cycle: they go when the last
    reference does. Left to the cyclic collector, every request would add to the full collections
    that stall all threads (server.freeze_startup_objects). (A failed one's exception keeps its
    traceback's frames, as any awaited exception in asyncio does, until the collector runs.)"""

    async def main() -> None:
        scheduler = Scheduler(FakeEngine(step_delay=0.002), config(mode=mode))
        scheduler.start()
        handles = [
            scheduler.submit(Request("fake", (5, 9, 11, 2), options(beam=2))),
            scheduler.submit(Request("fake", (7, 8, 3, 4, 10, 6, 2), options(), stream=True)),
        ]
        for handle in handles:
            await handle.result()
        await _until(lambda: scheduler.stats().in_flight == 0)
        refs = [weakref.ref(h) for h in handles]
        del handles, handle
        # The decode thread may still hold the last step's retired list for a moment after the
        # outcomes reached us; with the collector off, a cycle would keep them for good.
        deadline = time.monotonic() + 10.0
        while any(r() is not None for r in refs) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert [r() for r in refs] == [None, None]
        scheduler.stop()

    gc.collect()
    gc.disable()
    try:
        run(main)
    finally:
        gc.enable()


def test_deadline_passed_drops_the_request_in_the_batch_and_in_the_queue() -> None:
    async def main() -> None:
        engine = FakeEngine(step_delay=0.005)
        scheduler = Scheduler(engine, config(max_sequences=2))
        scheduler.start()
        soon = time.monotonic() + 0.03
        running = scheduler.submit(Request("fake", (3, 2), options(beam=2, max_out=200), deadline=soon))
        queued = scheduler.submit(Request("fake", (4, 2), options(), deadline=soon))  # no row free for it
        for handle in (running, queued):
            with pytest.raises(DeadlineExceededError):
                await handle.result()
        await _until(lambda: scheduler.stats().in_flight == 0)
        assert scheduler.stats().rows == 0
        scheduler.stop()

    run(main)


def test_a_failed_step_fails_only_its_requests_and_the_loop_goes_on() -> None:
    async def main() -> None:
        engine = FakeEngine(names=("a", "b"), step_delay=0.002)
        scheduler = Scheduler(engine, config())
        engine.fail_next_steps = 1
        doomed = [scheduler.submit(Request("a", tuple(s), options())) for s in FAKE_SOURCES[:3]]
        scheduler.start()  # after the three are queued: its first step has them all, and fails
        outcomes = [await outcome(h) for h in doomed]
        assert all(isinstance(o, StepFailedError) for o in outcomes), outcomes
        later = scheduler.submit(Request("a", tuple(FAKE_SOURCES[3]), options(beam=2)))
        generation = await later.result()
        assert_same(generation.hypotheses, fake_alone(FAKE_SOURCES[3], options(beam=2)))
        scheduler.stop()

    run(main)


def test_every_request_ends_in_exactly_one_outcome() -> None:
    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        engine = FakeEngine(names=("a", "b"), step_delay=0.001)
        scheduler = Scheduler(engine, config(max_sequences=6, max_queue_size=12), metrics)
        scheduler.start()
        handles: list[Handle] = []
        refused = 0
        for i in range(30):
            deadline = time.monotonic() + 0.01 if i % 5 == 4 else None
            request = Request("ab"[i % 2], tuple(FAKE_SOURCES[i % 6]), options(1 + i % 3, 40), deadline)
            try:
                handles.append(scheduler.submit(request))
            except QueueFullError:
                refused += 1
            if i % 7 == 3:
                handles[-1].cancel()
            if i % 4 == 0:
                engine.fail_next_steps = 1 if i == 8 else 0
                await asyncio.sleep(0.002)
        outcomes = [await outcome(h) for h in handles]
        kinds = {type(o).__name__ for o in outcomes}
        assert "Generation" in kinds and "RequestCancelledError" in kinds, kinds
        assert scheduler.stats().outcomes == len(handles) and refused + len(handles) == 30
        finished = sum(
            metrics.registry.get_sample_value("translator_sequences_finished_total", {"reason": r}) or 0
            for r in ("end_of_sequence", "length", "cancelled", "deadline", "error")
        )
        assert finished == len(handles)
        scheduler.stop()

    run(main)


@pytest.mark.parametrize("mode", ["continuous", "collect"])
def test_admitted_requests_count_their_queue_wait_and_source_tokens(mode: str) -> None:
    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        scheduler = Scheduler(FakeEngine(), config(mode=mode, max_wait_ms=1.0), metrics)
        scheduler.start()
        sources = FAKE_SOURCES[:4]
        for handle in [scheduler.submit(Request("fake", tuple(s), options())) for s in sources]:
            await handle.result()
        value = metrics.registry.get_sample_value
        assert value("translator_queue_wait_seconds_count") == len(sources)
        assert value("translator_input_tokens_total") == sum(len(s) for s in sources)
        scheduler.stop()

    run(main)


def test_drain_lets_in_flight_finish_and_refuses_new_requests() -> None:
    async def main() -> None:
        scheduler = Scheduler(FakeEngine(step_delay=0.002), config(max_sequences=2))
        scheduler.start()
        handles = [scheduler.submit(Request("fake", tuple(s), options())) for s in FAKE_SOURCES]
        drain = asyncio.ensure_future(scheduler.drain(timeout=30))
        await asyncio.sleep(0)
        with pytest.raises(SchedulerClosedError):
            scheduler.submit(Request("fake", (4, 2), options()))
        assert await drain
        for source, handle in zip(FAKE_SOURCES, handles, strict=True):
            assert_same((await handle.result()).hypotheses, fake_alone(source, options()))
        scheduler.stop()

    run(main)


def test_stop_fails_what_is_left_with_scheduler_closed() -> None:
    async def main() -> None:
        scheduler = Scheduler(FakeEngine(step_delay=0.002), config())
        scheduler.start()
        # endless, and its length limit 20 s away: it is still decoding when stopped
        handle = scheduler.submit(Request("fake", (3, 2), options(beam=2, max_out=10_000)))
        await wait_for_steps(scheduler, 1)
        scheduler.stop()
        with pytest.raises(SchedulerClosedError):
            await handle.result()

    run(main)


def test_zero_length_limit_ends_at_once() -> None:
    async def main() -> None:
        scheduler = Scheduler(FakeEngine(), config())
        scheduler.start()
        generation = await scheduler.submit(Request("fake", (4, 2), options(max_out=0))).result()
        assert generation.hypotheses[0].tokens == () and generation.finish_reason is FinishReason.LENGTH
        scheduler.stop()

    run(main)


# --- the real engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Any:
    if not (MODEL_DIR / "manifest.json").is_file():
        pytest.skip("models/en-fr-small is not built (make setup)")
    from service.config import EngineConfig
    from service.engine.engine import Engine

    # The variant the server picks on this CPU (int8): what ships is what must decode as if alone.
    return Engine(EngineConfig(model_dirs=(MODEL_DIR,), variant="auto", intra_op_threads=1))


@pytest.fixture(scope="module")
def device_cache_engine() -> Any:
    """The engine with its KV caches in the provider's memory (service/engine/device_kv_cache.py), which on
    this CPU-only machine runs the CUDA path's IOBinding and edit graphs on the CPU provider."""
    if not (MODEL_DIR / "manifest.json").is_file():
        pytest.skip("models/en-fr-small is not built (make setup)")
    from service.config import EngineConfig
    from service.engine.engine import Engine

    engine = Engine(
        EngineConfig(model_dirs=(MODEL_DIR,), variant="fp32", intra_op_threads=1, kv_cache="device")
    )
    assert engine.model().kv_cache == "device"
    return engine


SENTENCES = [
    "I give this page to Olivia.",
    "This ugly pillow is in Detroit and their bakers sell the oil to Krogar.",
    "She does not fall.",
    "An ugly visitor offers interesting butter and these natural cookies to Amélie.",
    "You go to the zoo.",
    "Does the busy musician study the calm recipes?",
]


@pytest.mark.parametrize("mode", ["continuous", "collect"])
@pytest.mark.parametrize("beam", [1, 4])
def test_real_engine_staggered_arrivals_equal_decoding_alone(engine: Any, mode: str, beam: int) -> None:
    from service.engine.reference_decoder import start_states, translate_ids
    from service.modeldir.tokenizer import Tokenizer

    info = engine.model()
    tokenizer = Tokenizer.from_file(MODEL_DIR / "tokenizer.json")
    sources = [tokenizer.encode_source(text, 128) for text in SENTENCES]
    graphs = engine.graphs(info.name)
    want = [translate_ids(graphs, [s], beam_size=beam, n_best=beam)[0] for s in sources]

    async def main() -> None:
        scheduler = Scheduler(engine, config(mode=mode, max_batch_size=3, max_wait_ms=2.0))
        scheduler.start()
        handles: list[Handle] = []
        for i, source in enumerate(sources):
            (state,) = start_states(info.dims, [source], beam, 1.0, None, beam)
            handles.append(
                scheduler.submit(Request(info.name, tuple(source), state.options, stream=beam == 1))
            )
            if i % 2 == 1:
                await wait_for_steps(scheduler, scheduler.stats().steps + 2)
        streamed = await asyncio.gather(*(_collect(h) for h in handles))
        for handle, hyps, tokens in zip(handles, want, streamed, strict=True):
            generation = await handle.result()
            assert_same(generation.hypotheses, hyps)
            assert tuple(tokens) == (generation.hypotheses[0].tokens if beam == 1 else ())
        scheduler.stop()

    run(main)


MIXED_SENTENCES = [  # the first 24 of the test split: 5 to 16 words
    "I give this page to Olivia.",
    "She builds the wall.",
    "An angry writer does not go to the dangerous schools.",
    "Marie invites their woman.",
    "I am in the seas.",
    "Is the useless bed in the lake?",
    "Zoé comes from Stockholm.",
    "This ugly pillow is in Detroit and their bakers sell the oil to Krogar.",
    "I call Gredi and fifty-three uncles paint.",
    "The women are silent.",
    "Sophie lives in the famous car.",
    "Four mothers do not throw this blanket and you choose the poem.",
    "Do I judge Félix?",
    "The doctor goes to our beach.",
    "The deaf father and the tired actor call the insect.",
    "Does the busy musician study the calm recipes?",
    "The silent nephew does not lift the bowls.",
    "We catch our ball.",
    "An ugly visitor offers interesting butter and these natural cookies to Amélie.",
    "His bee drinks this beer.",
    "Foubla does not study the purple song.",
    "You jump in Istanbul.",
    "They build ten houses and a baby does not drive the truck.",
    "You send simple messages to my soldier.",
]


@pytest.mark.parametrize("kv_cache", ["host", "device"])
def test_real_engine_mixed_beams_and_cancellations_share_steps_as_if_alone(
    kv_cache: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy and beam requests of many lengths join a running batch every few steps while others
    finish or are cancelled: rows leave, branch and move in the cache, its capacity grows and
    shrinks, and every output still equals the sentence decoded alone — with the cache in host
    memory, and in the provider's (the CUDA path, here on the CPU provider)."""
    from service.engine.reference_decoder import start_states, translate_ids

    engine = request.getfixturevalue("engine" if kv_cache == "host" else "device_cache_engine")
    from service.modeldir.tokenizer import Tokenizer

    info = engine.model()
    graphs = engine.graphs(info.name)
    tokenizer = Tokenizer.from_file(MODEL_DIR / "tokenizer.json")
    sources = [tokenizer.encode_source(text, 128) for text in MIXED_SENTENCES]
    beams = [(1, 3, 1, 2)[i % 4] for i in range(len(sources))]
    # the two longest (so still decoding when cancelled, two arrivals after their own)
    cancelled = set(sorted(range(len(sources) - 2), key=lambda i: -len(sources[i]))[:2])
    want = [translate_ids(graphs, [s], beam_size=b, n_best=b)[0] for s, b in zip(sources, beams, strict=True)]

    # Exactly 1 to 3 steps between arrivals, however slowly this runs: the decode thread waits in
    # the next step while a request arrives, so a cancelled one cannot have finished meanwhile.
    hold = StepHold()
    monkeypatch.setattr(engine, "step", hold.wrap(engine.step))

    async def main() -> None:
        scheduler = Scheduler(engine, config(mode="continuous", max_sequences=24))
        scheduler.start()
        handles: list[Handle] = []
        for i, (source, beam) in enumerate(zip(sources, beams, strict=True)):
            (state,) = start_states(info.dims, [source], beam, 1.0, None, beam)
            handles.append(scheduler.submit(Request(info.name, tuple(source), state.options)))
            if i - 2 in cancelled:  # two arrivals later: decoding by then, not finished
                handles[i - 2].cancel()
            steps = scheduler.stats().steps + 1 + i % 3
            hold.after(steps)
            await wait_for_steps(scheduler, steps)
        hold.release()
        for i, (handle, hyps) in enumerate(zip(handles, want, strict=True)):
            if i in cancelled:
                with pytest.raises(RequestCancelledError):
                    await handle.result()
            else:
                assert_same((await handle.result()).hypotheses, hyps)
        assert scheduler.stats().rows == 0 and scheduler.stats().kv_tokens == 0
        scheduler.stop()

    run(main)


def test_the_decode_loop_does_not_block_the_event_loop(engine: Any) -> None:
    from service.engine.reference_decoder import start_states
    from service.modeldir.tokenizer import Tokenizer

    info = engine.model()
    tokenizer = Tokenizer.from_file(MODEL_DIR / "tokenizer.json")
    # About 0.4 s of decoding on 2 idle cores (30 beams of 4): long enough that the event loop's
    # thread losing its core for a while on a busy machine (tens of ms) is not a quarter of it.
    sources = [tokenizer.encode_source(text, 128) for text in SENTENCES * 5]

    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        scheduler = Scheduler(engine, config(), metrics)
        scheduler.start()
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.001)
                ticks.append(time.monotonic())

        task = asyncio.ensure_future(ticker())
        start = time.monotonic()
        handles = []
        for source in sources:
            (state,) = start_states(info.dims, [source], 4, 1.0, None, 1)
            handles.append(scheduler.submit(Request(info.name, tuple(source), state.options)))
        generations = [await h.result() for h in handles]
        elapsed = time.monotonic() - start
        task.cancel()
        # A blocked event loop would pause for about the whole decode; a free one only for GIL
        # hand-overs (the decode thread's Python bookkeeping, a few ms at most).
        longest_pause = max(b - a for a, b in zip([start, *ticks], ticks, strict=False))
        assert len(ticks) > 10 and longest_pause < elapsed / 4, (len(ticks), longest_pause, elapsed)
        assert all(g.timings.time_to_first_token_s is not None for g in generations)
        scheduler.stop()  # joins the decode thread: its last step's bookkeeping is done
        steps = metrics.registry.get_sample_value("translator_decode_step_batch_size_count")
        assert steps == scheduler.stats().steps > 0

    run(main)
