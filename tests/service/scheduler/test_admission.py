"""Deadline-aware admission: the expected wait from the measured decode time and the live queue, and
the refusals it makes — as arithmetic, then through a scheduler whose engine is held."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from service.scheduler import Generation, QueueFullError, Request, RequestCancelledError, Scheduler
from service.scheduler.admission import DECODE_WEIGHT, Admission
from service.scheduler.types import QueueTooSlowError
from tests.service.scheduler.test_scheduler import ENDLESS, FakeEngine, config, options, run


def _request(deadline: float | None = None, beam: int = 1, max_out: int = 12) -> Request:
    return Request("fake", (4, 2), options(beam, max_out), deadline)


def test_nothing_is_expected_to_wait_before_a_request_has_finished() -> None:
    admission = Admission(config(max_sequences=4))
    assert admission.expected_wait(rows=1, slots=12, ahead=100, reserved=4) == 0.0
    assert admission.refusal(_request(deadline=0.001), now=0.0, ahead=100, reserved=4) is None


def test_the_wait_is_the_rows_ahead_beyond_the_free_ones_at_the_batch_drain_rate() -> None:
    admission = Admission(config(max_sequences=4, max_kv_cache_tokens=1000))
    admission.observe(2.0)  # a finished request decoded for 2 s: 4 rows leave every 2 s
    assert admission.expected_wait(rows=1, slots=12, ahead=0, reserved=3) == 0.0  # a row is free
    assert admission.expected_wait(rows=1, slots=12, ahead=2, reserved=3) == pytest.approx(1.0)
    assert admission.expected_wait(rows=2, slots=12, ahead=5, reserved=4) == pytest.approx(3.5)
    # the KV-cache budget binds for long requests: 1000 // 500 = 2 rows decode at once
    assert admission.capacity(500) == 2
    assert admission.expected_wait(rows=1, slots=500, ahead=1, reserved=2) == pytest.approx(2.0)
    # collect mode decodes at most a batch at a time
    assert Admission(config(mode="collect", max_sequences=64, max_batch_size=8)).capacity(12) == 8


def test_the_decode_time_is_a_moving_average() -> None:
    admission = Admission(config())
    admission.observe(1.0)
    admission.observe(3.0)
    assert admission.decode_s == pytest.approx(1.0 + DECODE_WEIGHT * 2.0)


def test_refused_when_the_deadline_leaves_less_than_the_wait_and_the_decode() -> None:
    admission = Admission(config(max_sequences=1, max_queue_wait_s=60.0))
    admission.observe(1.0)  # one row, freed every second
    # 2 rows ahead + 1 decoding: it waits 3 s, then decodes for about 1 s
    assert admission.refusal(_request(deadline=100.0 + 4.5), now=100.0, ahead=2, reserved=1) is None
    refusal = admission.refusal(_request(deadline=100.0 + 3.5), now=100.0, ahead=2, reserved=1)
    assert isinstance(refusal, QueueTooSlowError) and refusal.reason == "expected_wait"
    assert "wait about 3.00 s" in str(refusal) and "deadline leaves 3.50 s" in str(refusal)
    # one that joins at once is never refused for time, however short its deadline
    assert admission.refusal(_request(deadline=100.001), now=100.0, ahead=0, reserved=0) is None


def test_refused_when_the_wait_is_over_max_queue_wait_and_not_with_count_admission() -> None:
    admission = Admission(config(max_sequences=1, max_queue_wait_s=2.5))
    admission.observe(1.0)
    assert admission.refusal(_request(), now=0.0, ahead=1, reserved=1) is None  # 2 s
    refusal = admission.refusal(_request(), now=0.0, ahead=2, reserved=1)  # 3 s
    assert refusal is not None and "over the 2.5 s allowed (--max-queue-wait-s)" in str(refusal)
    unbounded = Admission(config(max_sequences=1, max_queue_wait_s=0.0))
    unbounded.observe(1.0)
    assert unbounded.refusal(_request(), now=0.0, ahead=1000, reserved=1) is None
    counting = Admission(config(max_sequences=1, admission="count"))
    counting.observe(1.0)
    assert counting.refusal(_request(deadline=0.5), now=0.0, ahead=1000, reserved=1) is None


def test_a_held_scheduler_refuses_at_once_what_its_deadline_cannot_wait_for() -> None:
    """One row; a first request decodes 20 steps of at least 10 ms (so the measured decode time is
    at least 0.2 s); then one holds the row with its steps held and another waits: a newcomer whose
    deadline leaves 0.1 s is refused at submit, one without a deadline is queued, and every
    accepted request still ends in exactly one outcome."""

    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        engine = FakeEngine(step_delay=0.01)
        scheduler = Scheduler(engine, config(max_sequences=1, max_queue_wait_s=60.0), metrics)
        scheduler.start()
        first = await scheduler.submit(Request("fake", (ENDLESS, 2), options(max_out=20))).result()
        assert first.steps == 20 and first.timings.decode_s >= 0.2
        engine.hold.after(len(engine.steps) + 1)
        running = scheduler.submit(Request("fake", (ENDLESS, 5, 2), options(max_out=200)))
        assert await asyncio.to_thread(engine.hold.wait_held)
        queued = scheduler.submit(Request("fake", (4, 2), options()))
        with pytest.raises(QueueTooSlowError, match=r"deadline leaves 0\.1") as refused:
            scheduler.submit(Request("fake", (5, 2), options(), deadline=time.monotonic() + 0.1))
        assert isinstance(refused.value, QueueFullError)  # RESOURCE_EXHAUSTED, as a full queue
        assert refused.value.expected_wait_s >= 0.2
        assert scheduler.stats().queued == 1
        rejected = metrics.registry.get_sample_value
        assert rejected("translator_requests_rejected_total", {"reason": "expected_wait"}) == 1
        running.cancel()
        engine.hold.release()
        with pytest.raises(RequestCancelledError):
            await running.result()
        assert isinstance(await queued.result(), Generation)
        assert scheduler.stats().outcomes == 3  # the refused one was never accepted
        scheduler.stop()

    run(main)
