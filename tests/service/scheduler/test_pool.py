"""SchedulerPool: instances in parallel over one engine, each output still the sentence decoded alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry

from service.config import SchedulerConfig
from service.metrics import Metrics
from service.scheduler import Handle, QueueFullError, Request, RequestTooLargeError
from service.scheduler.pool import SchedulerPool, instance_config
from tests.service.scheduler.test_scheduler import (
    ENDLESS,
    FAKE_SOURCES,
    FakeEngine,
    assert_same,
    config,
    fake_alone,
    options,
    run,
    wait_for_steps,
)


def test_the_limits_are_split_between_the_instances() -> None:
    each = instance_config(SchedulerConfig(instances=3, max_sequences=64, max_kv_cache_tokens=900))
    assert (each.instances, each.max_sequences, each.max_kv_cache_tokens, each.max_queue_size) == (
        1,
        21,
        300,
        1366,  # the default 4096, rounded up
    )
    # worker processes split the server's limits before their instances do
    each = instance_config(SchedulerConfig(instances=2, max_sequences=64, max_queue_size=9), workers=2)
    assert (each.max_sequences, each.max_queue_size) == (16, 3)


class _ThreadRecordingEngine(FakeEngine):
    """Records which thread ran each step, and lets two steps overlap (as onnxruntime does)."""

    def __init__(self) -> None:
        super().__init__(step_delay=0.002)
        self.threads: set[str] = set()

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.threads.add(threading.current_thread().name)
        return super().step(*args, **kwargs)


def test_requests_spread_over_the_instances_and_decode_as_if_alone() -> None:
    async def main() -> None:
        engine = _ThreadRecordingEngine()
        pool = SchedulerPool(engine, config(instances=2))
        pool.start()
        requests = [
            Request("fake", tuple(s), options(beam, max_out=9)) for s in FAKE_SOURCES for beam in (1, 2)
        ]
        handles: list[Handle] = []
        for i, request in enumerate(requests):
            handles.append(pool.submit(request))
            if i % 4 == 3:
                await wait_for_steps(pool.instances[0], pool.instances[0].stats().steps + 1)
        for request, handle in zip(requests, handles, strict=True):
            generation = await handle.result()
            assert_same(generation.hypotheses, fake_alone(request.source, request.options), tol=1e-6)
        assert engine.threads == {"scheduler-0", "scheduler-1"}
        assert pool.stats().outcomes == len(requests)
        pool.stop()

    run(main)


def test_gauges_are_the_sum_over_the_instances() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        engine = FakeEngine(step_delay=0.002)
        engine.hold.after(2)  # each instance's request still decodes while the gauges are read
        pool = SchedulerPool(engine, config(instances=2, max_kv_cache_tokens=1000), Metrics(registry))
        assert registry.get_sample_value("translator_kv_cache_capacity_tokens") == 1000
        pool.start()
        # two endless requests: the least loaded instance takes each, so one per instance
        handles = [pool.submit(Request("fake", (ENDLESS, i, 2), options(max_out=400))) for i in range(2)]
        for scheduler in pool.instances:
            await wait_for_steps(scheduler, 2)
        assert [s.stats().in_flight for s in pool.instances] == [1, 1]
        assert registry.get_sample_value("translator_sequences_in_flight") == 2
        assert pool.stats().in_flight == 2
        for handle in handles:
            handle.cancel()
        engine.hold.release()
        await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
        assert await pool.drain(5)
        pool.stop()

    run(main)


def test_refusals_name_the_process_limits() -> None:
    async def main() -> None:
        # each instance: 1 row, 1 waiting request, 20 KV-cache slots
        engine = FakeEngine(step_delay=0.002)
        engine.hold.after(1)  # the running ones (15 steps) still decode, the waiting ones still wait
        pool = SchedulerPool(
            engine, config(instances=2, max_sequences=2, max_queue_size=2, max_kv_cache_tokens=40)
        )
        pool.start()
        running = [pool.submit(Request("fake", (ENDLESS, i, 2), options(max_out=15))) for i in range(2)]
        for scheduler in pool.instances:
            await wait_for_steps(scheduler, 1)
        waiting = [pool.submit(Request("fake", (ENDLESS, i, 2), options(max_out=15))) for i in range(2)]
        with pytest.raises(QueueFullError, match=r"\(2 waiting, --max-queue-size\)"):
            pool.submit(Request("fake", (4, 2), options(max_out=15)))
        with pytest.raises(RequestTooLargeError, match="2 instances split"):
            pool.submit(Request("fake", (4, 2), options(max_out=30)))  # 30 slots > 20 per instance
        for handle in running + waiting:
            handle.cancel()
        engine.hold.release()
        await asyncio.gather(*(h.result() for h in running + waiting), return_exceptions=True)
        pool.stop()

    run(main)


def test_a_full_queue_sends_the_request_to_another_instance_and_counts_one_refusal() -> None:
    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        # not started: nothing leaves the queues. Each instance: 2 waiting requests.
        pool = SchedulerPool(FakeEngine(), config(instances=2, max_queue_size=4), metrics)
        # instance 0's queue filled past the pool (as a beam search holding its rows would leave it),
        # while the pool, counting outstanding requests, still sees both instances alike
        direct = [pool.instances[0].submit(Request("fake", (4, 2), options())) for _ in range(2)]
        handles = [pool.submit(Request("fake", (5, 2), options())) for _ in range(2)]  # both go to 1
        assert pool.instances[1].stats().queued == 2
        with pytest.raises(QueueFullError, match=r"\(4 waiting, --max-queue-size\)"):
            pool.submit(Request("fake", (6, 2), options()))  # every queue full now
        rejected = metrics.registry.get_sample_value
        assert rejected("translator_requests_rejected_total", {"reason": "queue_full"}) == 1
        pool.stop()  # fails what waits
        await asyncio.gather(*(h.result() for h in direct + handles), return_exceptions=True)

    run(main)


def test_a_worker_names_the_workers_splitting_the_limits() -> None:
    async def main() -> None:
        # a worker of 2: 2 instances of 10 KV-cache slots each out of the server's 40
        pool = SchedulerPool(FakeEngine(), config(instances=2, max_kv_cache_tokens=40), workers=2)
        pool.start()
        with pytest.raises(RequestTooLargeError, match=r"2 worker processes × 2 instances split"):
            pool.submit(Request("fake", (4, 2), options(max_out=15)))
        pool.stop()

    run(main)


def test_the_auto_instance_count_must_be_resolved_first() -> None:
    with pytest.raises(ValueError, match="resolve_parallelism"):
        SchedulerPool(FakeEngine(), SchedulerConfig(instances=0))


def test_the_pool_says_what_one_request_can_get_and_who_split_it() -> None:
    alone = SchedulerPool(FakeEngine(), config(instances=1, max_sequences=4, max_queue_size=3))
    assert (alone.share.max_sequences, alone.queue_capacity, alone.split) == (4, 3, "")
    assert alone.queue_setting == "--max-queue-size"
    # every instance gets its share of the queue rounded up: 3 over 2 is 2 each, 4 in all
    pair = SchedulerPool(FakeEngine(), config(instances=2, max_sequences=4, max_queue_size=3))
    assert (pair.share.max_sequences, pair.queue_capacity) == (2, 4)
    assert pair.split == "2 instances split (--instances)"
    worker = SchedulerPool(FakeEngine(), config(instances=2, max_queue_size=8), workers=2)
    assert worker.queue_capacity == 4
    assert worker.split == "2 worker processes × 2 instances split (--workers, --instances)"
    assert "2 worker processes split (--workers)" in worker.queue_setting
