"""Deadline-aware admission: the wait a new request can expect in one scheduler's queue, and whether
to take it.

A running batch decodes up to `capacity` rows at once (max_sequences; fewer when the KV-cache budget
binds at the request's length limit; in collect mode at most max_batch_size). While it is full, rows
free up as requests finish: about `capacity` rows every `decode_s` seconds, `decode_s` being the
exponentially weighted average decode time (joining the batch → its end) of the requests that
finished lately — Little's law for the batch, measured at the load the batch has now rather than
at the rate requests happen to arrive. A newcomer of `rows` rows, with `ahead` rows of live requests
queued before it and `reserved` rows decoding, joins once `ahead + rows + reserved − capacity` rows
have left: it expects to wait that many × `decode_s` / `capacity` seconds, 0 when it fits at once.

It is refused at once (`QueueTooSlowError`, RESOURCE_EXHAUSTED) when it would have to wait and
- its deadline leaves less than the expected wait plus its own decode time: it would expire having
  held a place in the queue, perhaps rows too, and its client learns it only at the deadline, too
  late to retry elsewhere; or
- the expected wait is over `max_queue_wait_s` (a bound in time for requests without a deadline).
A request that would join the batch at once is never refused for time, and nothing is refused for
time until a request has finished (nothing measured yet). Figures: docs/reliability.md, Overload.
"""

from __future__ import annotations

from service.config import SchedulerConfig
from service.scheduler.types import QueueTooSlowError, Request

# The weight of the latest finished request in the average decode time: about the last 32 count,
# a fraction of a second at the few hundred sentences/s of a 2-core CPU, so the estimate follows
# the batch as it fills, while one long or short sentence moves it little.
DECODE_WEIGHT = 1 / 32


class Admission:
    """One scheduler's expected-wait estimate and admission rule; the scheduler calls it under its
    lock (the decode thread observes, submitters ask)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.decode_s: float | None = None  # average decode time of finished requests; None: none yet

    def observe(self, decode_s: float) -> None:
        """A request finished after `decode_s` seconds in the running batch."""
        if self.decode_s is None:
            self.decode_s = decode_s
        else:
            self.decode_s += DECODE_WEIGHT * (decode_s - self.decode_s)

    def capacity(self, slots: int) -> int:
        """Rows that decode at once when every request may reach `slots` self-attention slots."""
        rows = min(self.config.max_sequences, self.config.max_kv_cache_tokens // max(1, slots))
        if self.config.mode == "collect":
            rows = min(rows, self.config.max_batch_size)
        return max(1, rows)

    def expected_wait(self, *, rows: int, slots: int, ahead: int, reserved: int) -> float:
        """Seconds a request of `rows` rows and `slots` slots would wait in the queue behind `ahead`
        queued rows, with `reserved` rows decoding (0: it joins at once, or nothing measured yet)."""
        if self.decode_s is None:
            return 0.0
        capacity = self.capacity(slots)
        excess = ahead + rows + reserved - capacity
        return 0.0 if excess <= 0 else excess * self.decode_s / capacity

    def refusal(self, request: Request, *, now: float, ahead: int, reserved: int) -> QueueTooSlowError | None:
        """Why `request` must be refused now (see the module docstring), or None to queue it."""
        if self.config.admission != "wait":
            return None
        options = request.options
        wait = self.expected_wait(
            rows=options.beam_size, slots=options.max_output_tokens, ahead=ahead, reserved=reserved
        )
        if wait <= 0.0 or self.decode_s is None:
            return None
        if request.deadline is not None and wait + self.decode_s > request.deadline - now:
            return QueueTooSlowError(wait, self.decode_s, time_left_s=request.deadline - now)
        bound = self.config.max_queue_wait_s
        if bound and wait > bound:
            return QueueTooSlowError(wait, self.decode_s, max_wait_s=bound)
        return None
