"""Several scheduler instances over one engine: decode loops that run in parallel.

    pool = SchedulerPool(engine, config.scheduler, metrics)   # config.instances schedulers
    pool.start(); handle = pool.submit(request); await pool.drain(timeout); pool.stop()

Each instance is a `service.scheduler.scheduler.Scheduler` with its own decode thread, queue and running
batch (Triton's model instances). They share the engine's onnxruntime sessions, which release the
GIL while they run, so one instance's graph runs overlap the others' Python bookkeeping and graph
runs: on a 2-core CPU two callers with one intra-op thread each decode faster than one caller with
two threads (docs/benchmarks.md, the engine-alone table). A request goes to the instance with the
fewest requests outstanding (queued or decoding) and stays there. The configured limits (max_sequences,
max_kv_cache_tokens, max_queue_size) are the server's, split evenly between its worker processes
(--workers, service/workers.py) and then between each worker's instances; the gauges each
instance sets are summed into the process's figure, and the workers' into the server's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.config import SchedulerConfig
from service.scheduler.handle import Handle
from service.scheduler.scheduler import Scheduler, SchedulerStats
from service.scheduler.types import (
    QueueFullError,
    QueueTooSlowError,
    Request,
    RequestTooLargeError,
    StepEngine,
)

if TYPE_CHECKING:
    from service.metrics import Metrics


def instance_config(config: SchedulerConfig, workers: int = 1) -> SchedulerConfig:
    """One instance's share of the server's limits, `workers` processes of `config.instances`
    instances each splitting them (at least 1 of each)."""
    n = config.instances * workers
    return dataclasses.replace(
        config,
        instances=1,
        max_sequences=max(1, config.max_sequences // n),
        max_kv_cache_tokens=max(1, config.max_kv_cache_tokens // n),
        max_queue_size=max(1, math.ceil(config.max_queue_size / n)),
    )


class SchedulerPool:
    """`config.instances` schedulers behind one submit (see the module docstring)."""

    def __init__(
        self,
        engine: StepEngine,
        config: SchedulerConfig,
        metrics: Metrics | None = None,
        *,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.instances < 1:
            raise ValueError(
                f"instances {config.instances}: resolve the auto setting first (config.resolve_parallelism)"
            )
        self.config, self._workers, self._metrics = config, workers, metrics
        self.share = instance_config(config, workers)  # what each instance holds
        self.instances = [
            Scheduler(engine, self.share, metrics, clock=clock, instance=i) for i in range(config.instances)
        ]
        self._outstanding = [0] * len(self.instances)  # submitted and not yet ended, per instance
        self._lock = threading.Lock()  # submitters may run on several event loops

    def start(self) -> None:
        for scheduler in self.instances:
            scheduler.start()

    def submit(self, request: Request) -> Handle:
        """Queue `request` on the least loaded instance, or, when its queue is full, on the next
        least loaded whose queue has room; raises what `Scheduler.submit` raises, with the limits
        named as configured for the server rather than as one instance's share.

        Least loaded counts requests outstanding, queued or decoding, so an instance whose rows a
        beam search holds can have a full queue, or a longer expected wait, while another's has
        room: the request is refused (RESOURCE_EXHAUSTED, counted once) only when every instance
        refuses it, with the shortest wait expected, if any instance refused it for time.
        """
        with self._lock:
            order = sorted(range(len(self.instances)), key=self._outstanding.__getitem__)
        refusals: list[QueueFullError] = []
        for index in order:
            try:
                return self._submit_to(index, request)
            except QueueFullError as refusal:
                refusals.append(refusal)
        slow = [r for r in refusals if isinstance(r, QueueTooSlowError)]
        error = (
            min(slow, key=lambda r: r.expected_wait_s) if slow else QueueFullError(self.config.max_queue_size)
        )
        if self._metrics is not None:
            self._metrics.request_rejected(error.reason)
        raise error from None

    def _submit_to(self, index: int, request: Request) -> Handle:
        with self._lock:
            self._outstanding[index] += 1
        try:
            # counted once by submit, when every instance has refused it
            handle = self.instances[index].submit(request, count_queue_full=False)
        except RequestTooLargeError as err:
            self._ended(index)
            if not self.split:
                raise
            raise RequestTooLargeError(
                f"{err}: that is one scheduler instance's share of the limits, which {self.split}"
            ) from None
        except BaseException:
            self._ended(index)
            raise
        handle.add_done_callback(lambda: self._ended(index))
        return handle

    @property
    def split(self) -> str:
        """Who splits the server's limits, for messages ("2 instances split (--instances)"); "" when
        one instance holds them whole."""
        if len(self.instances) * self._workers == 1:
            return ""
        if self._workers == 1:
            return f"{len(self.instances)} instances split (--instances)"
        each = f"{self._workers} worker processes × {len(self.instances)} instances"
        return f"{each} split (--workers, --instances)"

    @property
    def queue_capacity(self) -> int:
        """Requests that can wait at once over this process's instances: more texts than this in one
        call are refused on an idle server too, since every text is queued before any decodes."""
        return self.share.max_queue_size * len(self.instances)

    @property
    def queue_setting(self) -> str:
        """Where `queue_capacity` comes from, for messages."""
        if self._workers == 1:
            return "--max-queue-size"
        return (
            f"this worker process's share of --max-queue-size, which {self._workers} worker processes "
            "split (--workers)"
        )

    def _ended(self, index: int) -> None:
        with self._lock:
            self._outstanding[index] -= 1

    async def drain(self, timeout: float | None = None) -> bool:
        """Every instance stops accepting and finishes what it accepted; True if all did in time."""
        return all(await asyncio.gather(*(s.drain(timeout) for s in self.instances)))

    def stop(self, timeout: float | None = 10.0) -> None:
        for scheduler in self.instances:
            scheduler.stop(timeout)

    def stats(self) -> SchedulerStats:
        """The instances' snapshots added up."""
        parts = [s.stats() for s in self.instances]
        return SchedulerStats(
            *(sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(SchedulerStats))
        )
