"""The scheduler: a bounded queue in front of one decode thread that batches requests.

    scheduler = Scheduler(engine, config.scheduler, metrics)
    scheduler.start()                              # the decode thread
    handle = scheduler.submit(request)             # QueueFullError / SchedulerClosedError at once
    async for ids in handle.tokens(): ...          # stream requests: new token ids as chosen
    generation = await handle.result()             # or the outcome error
    await scheduler.drain(timeout); scheduler.stop()

Continuous mode (iteration-level batching), each iteration of the decode thread serves one model
(round-robin over the models with work; rows of different models never share a step):
*schedule* (retire cancelled / past-deadline requests; admit waiting requests FIFO within the
limits, encoding the newcomers of the model in one call and merging them into the running batch),
*execute* (one decoder step for every running row), *update* (advance each request's search,
stream new tokens, retire what finished and compact the batch) — see `RunningBatch`.

Admission rule (a guarantee, so nothing is ever preempted): a request reserves `beam_size` rows
(its worst case, even while fewer beams are live) and each of its rows can reach
`max_output_tokens` self-attention slots. A model's batch is one padded tensor, so its cache
holds at most rows × the longest limit among its requests; a newcomer joins while
(a) reserved rows over all models ≤ max_sequences and (b) Σ over models of
reserved rows × longest limit ≤ max_kv_cache_tokens, both counted with the newcomer. The queue
is strictly FIFO: the first request that does not fit waits, and the ones behind it wait too
(no overtaking, no starvation). A request that cannot fit an empty scheduler is refused at submit
(RequestTooLargeError). The cross-attention K/V (rows × source tokens) is not counted.

Admission to the queue: it holds live requests only (one cancelled while waiting leaves it at
once, its outcome settled by the decode thread; one past its deadline leaves at the next sweep, or
at once when the queue is full), at most max_queue_size of them, and a request that would wait
longer than its deadline leaves or max_queue_wait_s is refused at once (QueueTooSlowError;
`service.scheduler.admission` estimates the wait).

Collect mode (the baseline the benchmark compares): wait until max_batch_size requests of one
model are queued or max_wait_ms has passed since the oldest, then decode that group to completion
with nothing joining (finished rows still leave); cancellation and deadlines are checked between
steps, in the group and in the queue, as in continuous mode.

The decode thread is the only caller of the engine; onnxruntime releases the GIL, so the event
loop keeps running. Outcomes and stream tokens cross to the submitter's event loop with
`loop.call_soon_threadsafe`. No grpc and no onnxruntime here: the servicer maps the errors of
`service.scheduler.types` to status codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.config import SchedulerConfig
from service.scheduler.admission import Admission
from service.scheduler.batch import Retired, RunningBatch, Ticket
from service.scheduler.handle import Handle, Outbox
from service.scheduler.queue import WaitingQueue
from service.scheduler.types import (
    Generation,
    QueueFullError,
    Request,
    RequestTooLargeError,
    SchedulerClosedError,
    SchedulerError,
    StepEngine,
)

if TYPE_CHECKING:  # only the type: service.metrics imports grpc
    from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler, for tests and health checks."""

    queued: int  # requests waiting
    in_flight: int  # requests in running batches
    rows: int  # decoder rows of the next steps (live beams)
    kv_tokens: int  # self-attention cache slots held (rows × padded slots)
    steps: int  # decoder steps run since start
    outcomes: int  # requests that ended (any outcome) since start


class Scheduler:
    """Queue, batch and decode requests on one thread (see the module docstring).

    Args:
        engine: the step-level engine (`service.engine.engine.Engine`, or a fake in tests).
        config: mode, limits, queue size, collect-mode batch and wait.
        metrics: when given, queue, batch, cache, latency and token metrics are recorded.
        clock: monotonic seconds (deadlines are compared with it).
        instance: its number among the instances of a `service.scheduler.pool.SchedulerPool` (the
            gauges it sets are summed over instances).
    """

    def __init__(
        self,
        engine: StepEngine,
        config: SchedulerConfig,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        instance: int = 0,
    ) -> None:
        self.engine, self.config, self.metrics, self.clock = engine, config, metrics, clock
        self.instance = instance
        self._cond = threading.Condition()
        self._waiting = WaitingQueue()  # live requests only; guarded by _cond
        self._reserved_rows = 0  # rows reserved in the running batches; guarded by _cond
        self._admission = Admission(config)  # guarded by _cond
        self._closed = False  # no new requests (draining or stopped); guarded by _cond
        self._stopping = False  # the thread should fail what is left and exit; guarded by _cond
        self._batches: dict[str, RunningBatch] = {}  # the decode thread's
        self._turn = 0  # round-robin position over the models
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()  # stream tokens and outcomes, flushed by _finish
        self._stats = SchedulerStats(0, 0, 0, 0, 0, 0)
        self._steps = 0  # the decode thread's
        self._accepted = self._outcomes = 0  # requests queued / ended since start; guarded by _cond
        if metrics is not None:
            metrics.set_kv_cache(0, config.max_kv_cache_tokens, instance=instance)

    # --- the asyncio side ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the decode thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.instance}", daemon=True)
            self._thread.start()

    def submit(self, request: Request, *, count_queue_full: bool = True) -> Handle:
        """Queue a request; call from a coroutine (the handle belongs to the running event loop).
        `count_queue_full` False: a refusal (full queue, expected wait) is not counted as a
        rejection (the caller tries another instance first, and counts the request's refusal itself
        if every one refuses it).

        Raises:
            QueueFullError: max_queue_size requests are already waiting; as QueueTooSlowError, the
                wait it can expect is longer than its deadline leaves or max_queue_wait_s
                (service.scheduler.admission).
            SchedulerClosedError: draining or stopped.
            RequestTooLargeError: it could never fit max_sequences / max_kv_cache_tokens.
            ValueError: a model the engine does not serve.
        """
        if request.model not in self.engine.models:
            raise ValueError(f"unknown model {request.model!r}; serving {', '.join(self.engine.models)}")
        self._check_fits(request)
        ticket: Ticket
        handle = Handle(asyncio.get_running_loop(), lambda: self._cancel(ticket), self._outbox)
        ticket = Ticket(request, handle._emit, handle._settle, self.clock())
        with self._cond:
            if self._closed:
                self._reject("draining")
                raise SchedulerClosedError("the server is shutting down and takes no new requests")
            refusal = self._refusal(request, ticket.submitted_at)
            if refusal is not None:
                if count_queue_full:
                    self._reject(refusal.reason)
                raise refusal
            self._waiting.append(ticket)
            self._accepted += 1
            # Published under the lock, as every change of the queue is: published after it, this
            # depth could land after the decode thread had taken the request and published the
            # emptier queue, and stay, a request shown waiting on an idle server.
            self._publish_queue()
            self._cond.notify_all()
        return handle

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting requests and wait until every accepted one has ended; True if all did."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else self.clock() + timeout
        while not self._idle():
            if deadline is not None and self.clock() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def stop(self, timeout: float | None = 10.0) -> None:
        """Refuse new requests, fail the waiting and running ones (SchedulerClosedError) and end the
        thread; blocks for at most the step in progress (or `timeout`)."""
        with self._cond:
            self._closed = self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._fail_all(SchedulerClosedError("the scheduler stopped before this request ended"))

    def stats(self) -> SchedulerStats:
        """The latest snapshot (batch figures as of the last step; `outcomes` current)."""
        with self._cond:
            return dataclasses.replace(self._stats, outcomes=self._outcomes)

    def _idle(self) -> bool:
        with self._cond:
            return self._outcomes == self._accepted

    def _cancel(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.cancelled_at is None:  # a call cancels its texts again as it ends: the first counts
                ticket.cancelled_at = self.clock()
            if self._waiting.leave(
                ticket, ticket.cancelled_at
            ):  # its place is free now, not at the next sweep
                self._publish_queue()
            self._cond.notify_all()

    def _refusal(self, request: Request, now: float) -> QueueFullError | None:
        """Under the lock: why `request` cannot be queued now, or None."""
        full = self.config.max_queue_size
        if len(self._waiting) >= full and self._waiting.drop_expired(now):  # they no longer count
            self._publish_queue()
        if len(self._waiting) >= full:
            return QueueFullError(full)
        return self._admission.refusal(
            request, now=now, ahead=self._waiting.rows, reserved=self._reserved_rows
        )

    def _check_fits(self, request: Request) -> None:
        rows, slots = request.options.beam_size, request.options.max_output_tokens
        if rows > self.config.max_sequences:
            raise RequestTooLargeError(
                f"beam_size {rows} is over the scheduler's max_sequences {self.config.max_sequences}"
            )
        if rows * slots > self.config.max_kv_cache_tokens:
            raise RequestTooLargeError(
                f"beam_size {rows} × max_output_tokens {slots} is over the KV-cache budget "
                f"{self.config.max_kv_cache_tokens} tokens (--max-kv-cache-tokens)"
            )

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.request_rejected(reason)

    # --- the decode thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.config.mode == "collect":
                self._run_collect()
            else:
                self._run_continuous()
        except Exception:  # a bug in the loop itself: fail everything rather than hang the callers
            log.exception("the scheduler loop crashed")
        finally:
            self._fail_all(SchedulerClosedError("the scheduler stopped before this request ended"))

    def _run_continuous(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._stopping
                    and not self._waiting
                    and not self._waiting.left
                    and not any(self._batches.values())
                ):
                    self._cond.wait()
                if self._stopping:
                    return
                expired = self._sweep_queue()
            self._finish(expired)
            model = self._next_model()
            if model is None:
                continue
            batch = self._batch(model)
            self._finish(batch.retire(self.clock()))
            if self._admit_now(batch):
                self._admit(batch, self._take(model))
            self._step(batch)

    def _run_collect(self) -> None:
        while True:
            with self._cond:
                group = self._collect_group()
                if group is None:
                    return
            batch = self._batch(group[0].request.model)
            self._admit(batch, group)
            del group  # the batch holds them now; waiting for the next group must not keep them alive
            self._publish()
            while len(batch):
                with self._cond:
                    if self._stopping:
                        return
                    # The waiting requests too, as in continuous mode: one that was cancelled or
                    # expired leaves now, not when the group ends, nor holds a place in the queue.
                    gone = self._sweep_queue()
                self._finish(gone + batch.retire(self.clock()))
                self._step(batch)

    def _collect_group(self) -> list[Ticket] | None:
        """Under the lock: wait for a full group or the oldest's max wait; None when stopping."""
        while True:
            expired = self._sweep_queue()
            if expired:
                self._cond.release()
                try:
                    self._finish(expired)
                finally:
                    self._cond.acquire()
            if self._stopping:
                return None
            if not self._waiting:
                self._cond.wait()
                continue
            model = self._waiting.first().request.model
            same = [t for t in self._waiting if t.request.model == model]
            wait = self._waiting.first().submitted_at + self.config.max_wait_ms / 1000 - self.clock()
            if len(same) < self.config.max_batch_size and wait > 0 and not self._closed:
                self._cond.wait(min(wait, self._next_deadline_in()))
                continue
            group: list[Ticket] = []
            rows = slots = 0
            for t in same[: self.config.max_batch_size]:
                new_rows, new_slots = rows + t.rows, max(slots, t.max_slots)
                if group and (
                    new_rows > self.config.max_sequences
                    or new_rows * new_slots > self.config.max_kv_cache_tokens
                ):
                    break
                group.append(t)
                rows, slots = new_rows, new_slots
            self._waiting.remove(group)
            self._reserved_rows += rows
            self._publish_queue()
            return group

    def _next_deadline_in(self) -> float:
        deadlines = [t.request.deadline for t in self._waiting if t.request.deadline is not None]
        return max(0.0, min(deadlines) - self.clock()) if deadlines else 3600.0

    def _sweep_queue(self) -> list[Retired]:
        """Under the lock: the requests that left the queue cancelled (`_cancel` took them out) or
        past their deadline (taken out now), to be settled."""
        if self._waiting.drop_expired(self.clock()):
            self._publish_queue()
        return self._waiting.take_left()

    def _next_model(self) -> str | None:
        """The next model with running rows or waiting requests, round-robin."""
        with self._cond:
            busy = {m for m, b in self._batches.items() if len(b)} | {t.request.model for t in self._waiting}
        if not busy:
            return None
        names = list(self.engine.models)
        for i in range(len(names)):
            name = names[(self._turn + i) % len(names)]
            if name in busy:
                self._turn = (self._turn + i + 1) % len(names)
                return name
        return None

    def _batch(self, model: str) -> RunningBatch:
        if model not in self._batches:
            self._batches[model] = RunningBatch(self.engine, model, self.clock)
        return self._batches[model]

    def _admit_now(self, batch: RunningBatch) -> bool:
        """Whether the waiting requests of `batch`'s model join it at this iteration: at once into an
        empty batch, else as a group of at least admit_ratio × the running rows, or when the batch
        has run max_admit_delay_steps steps since it last took newcomers (TGI's
        waiting_served_ratio and max_waiting_tokens, in rows and steps)."""
        if not len(batch) or batch.steps_since_admit >= self.config.max_admit_delay_steps:
            return True
        with self._cond:
            waiting = sum(t.rows for t in self._waiting if t.request.model == batch.model)
        return waiting > 0 and waiting >= self.config.admit_ratio * batch.rows

    def _take(self, model: str) -> list[Ticket]:
        """Waiting requests of `model` that fit, in FIFO order, stopping at the first that does not."""
        rows = sum(b.reserved_rows for b in self._batches.values())
        kv = sum(b.reserved_rows * b.max_slots for b in self._batches.values())
        batch = self._batches[model]
        model_rows, model_slots = batch.reserved_rows, batch.max_slots
        taken: list[Ticket] = []
        with self._cond:
            for t in self._waiting:
                if t.request.model != model:
                    continue
                new_model_rows, new_slots = model_rows + t.rows, max(model_slots, t.max_slots)
                new_kv = kv - model_rows * model_slots + new_model_rows * new_slots
                if rows + t.rows > self.config.max_sequences or new_kv > self.config.max_kv_cache_tokens:
                    break
                taken.append(t)
                rows, kv, model_rows, model_slots = rows + t.rows, new_kv, new_model_rows, new_slots
            if taken:
                self._waiting.remove(taken)
                self._reserved_rows += sum(t.rows for t in taken)  # before the next submit's estimate
                self._publish_queue()
        return taken

    def _admit(self, batch: RunningBatch, tickets: Sequence[Ticket]) -> None:
        """Requests leaving the queue join `batch` (both modes come through here)."""
        retired = batch.admit(tickets)
        if self.metrics is not None:
            for t in tickets:
                # the admission time the batch stamped, which the response's Timings.queue_seconds
                # also reports: the histogram holds the very values the clients were told
                assert t.admitted_at is not None
                self.metrics.observe_queue_wait(t.admitted_at - t.submitted_at)
                self.metrics.add_tokens(input_tokens=len(t.request.source))
        self._finish(retired)

    def _step(self, batch: RunningBatch) -> None:
        if not len(batch):
            self._publish()
            return
        rows, start = batch.rows, time.perf_counter()
        retired = batch.step()
        seconds = time.perf_counter() - start
        self._steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(rows, seconds)
        self._finish(retired)
        self._publish()

    def _finish(self, retired: Sequence[Retired]) -> None:
        """Count each retired request, settle its handle (exactly once), and deliver what the
        handles were given since the last call (stream tokens included)."""
        for r in retired:
            self._observe_end(r)
            with self._cond:
                self._outcomes += 1  # before the handle can see its outcome
                if isinstance(r.outcome, Generation) and r.outcome.steps:
                    self._admission.observe(r.outcome.timings.decode_s)
            r.ticket.settle(r.outcome)
        if retired:  # before the handles hear of it: a caller that has its outcome finds it gone
            self._publish()  # from the stats and the gauges (in flight, KV cache used)
        self._outbox.flush()

    def _observe_end(self, r: Retired) -> None:
        if self.metrics is None:
            return
        self.metrics.sequence_finished(r.reason)
        if not isinstance(r.outcome, Generation):
            return
        g = r.outcome
        # The end token counts, as Translation.output_tokens counts it: it took a decoder step too.
        self.metrics.add_tokens(output_tokens=g.hypotheses[0].length)
        if g.timings.time_to_first_token_s is not None:
            self.metrics.observe_time_to_first_token(g.timings.time_to_first_token_s)
            # The mean gap between its decoder steps, from the first token's to the last's (the end
            # token's, when chosen): a greedy request takes one step per output token, the end
            # token included, as Translation.output_tokens counts them.
            after_first = g.timings.queue_wait_s + g.timings.decode_s - g.timings.time_to_first_token_s
            if g.steps > 1:
                self.metrics.observe_time_per_output_token(max(0.0, after_first) / (g.steps - 1))

    def _fail_all(self, error: SchedulerError) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.remove(waiting)
            left = self._waiting.take_left()
        retired = left + [Retired(t, error, "error") for t in waiting]
        for batch in self._batches.values():
            retired += [Retired(e.ticket, error, "error") for e in batch.entries]
            batch.entries = []
        self._batches.clear()
        self._finish(retired)

    def _publish_queue(self) -> None:
        """Under the lock: the queue depth changed."""
        self._stats = dataclasses.replace(self._stats, queued=len(self._waiting))
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self._waiting), instance=self.instance)

    def _publish(self) -> None:
        batches = list(self._batches.values())
        in_flight = sum(len(b) for b in batches)
        rows = sum(b.rows for b in batches)
        kv = sum(b.kv_tokens for b in batches)
        with self._cond:
            self._stats = SchedulerStats(len(self._waiting), in_flight, rows, kv, self._steps, self._outcomes)
            self._reserved_rows = sum(b.reserved_rows for b in batches)
        if self.metrics is not None:
            self.metrics.set_in_flight(in_flight, instance=self.instance)
            self.metrics.set_kv_cache(kv, self.config.max_kv_cache_tokens, instance=self.instance)
