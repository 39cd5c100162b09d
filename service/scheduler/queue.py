"""One scheduler's queue: the live requests waiting to join its running batch, FIFO.

Only live requests are in it, so that only they count, for admission and for the queue-depth
gauge (the autoscaler reads it): a request cancelled while it waits leaves at once (`leave`), one
past its deadline at the next `drop_expired`. Either waits in `left` until the decode thread settles
its outcome. Not locked itself: the scheduler holds its lock around every call.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence

from service.scheduler.batch import Retired, Ticket


class WaitingQueue:
    """The live waiting requests, FIFO, and the ones that left unfinished, to be settled."""

    def __init__(self) -> None:
        self._tickets: deque[Ticket] = deque()
        self.rows = 0  # rows of the waiting requests (a beam of K counts K)
        self.left: list[Retired] = []  # left unfinished (cancelled, expired), not yet settled
        self._next_expiry = math.inf  # no waiting request's deadline is before this

    def __len__(self) -> int:
        return len(self._tickets)

    def __iter__(self) -> Iterator[Ticket]:
        return iter(self._tickets)

    def first(self) -> Ticket:
        return self._tickets[0]

    def append(self, ticket: Ticket) -> None:
        self._tickets.append(ticket)
        ticket.queued = True
        self.rows += ticket.rows
        if ticket.request.deadline is not None:
            self._next_expiry = min(self._next_expiry, ticket.request.deadline)

    def remove(self, tickets: Sequence[Ticket]) -> None:
        """`tickets`, all waiting, leave the queue (to the running batch, or to fail)."""
        for t in tickets:
            t.queued = False
            self.rows -= t.rows
        if len(tickets) == 1:
            self._tickets.remove(tickets[0])
        elif tickets:
            self._tickets = deque(t for t in self._tickets if t.queued)

    def leave(self, ticket: Ticket, now: float) -> bool:
        """A cancelled `ticket` leaves now if it waits (its outcome to `left`); False if it did not."""
        if not ticket.queued:
            return False
        leaving = ticket.leaving(now)
        assert leaving is not None, "only a cancelled or expired request leaves the queue"
        self.remove([ticket])
        self.left.append(leaving)
        return True

    def drop_expired(self, now: float) -> bool:
        """The requests past their deadline at `now` leave (their outcomes to `left`); True if any did."""
        if now < self._next_expiry:
            return False
        leaving = [r for r in (t.leaving(now) for t in self._tickets) if r is not None]
        self.remove([r.ticket for r in leaving])
        self.left += leaving
        deadlines = (t.request.deadline for t in self._tickets if t.request.deadline is not None)
        self._next_expiry = min(deadlines, default=math.inf)
        return bool(leaving)

    def take_left(self) -> list[Retired]:
        """The requests that left unfinished since the last call, for the decode thread to settle."""
        left, self.left = self.left, []
        return left
