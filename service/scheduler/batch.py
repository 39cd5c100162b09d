"""One model's running batch: the rows that share a decoder step, and the three verbs of an iteration.

`RunningBatch` is owned by the scheduler's decode thread (no locks here). Its rows are the live
beams of its requests, request by request (a request's beams are contiguous and travel
together). An iteration is: `retire` (cancelled / past deadline), `admit` (encode the newcomers
together and merge them), `step` (one decoder step for every row with each row's own position,
then `advance` each request's search, reorder the cache by the beams' parents and drop what
finished). The cache is a `service.engine.kv_cache.KVCache`: rows join and leave it without the others
being copied. Every output equals the sentence decoded alone: rows never see each other (each
row's own slots, masked beyond its length), which `tests/service/test_scheduler.py` checks
against the reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.decoding import SearchState, advance_rows, start_search
from service.engine.kv_cache import BatchCache
from service.scheduler.types import (
    DeadlineExceededError,
    FinishReason,
    Generation,
    Request,
    RequestCancelledError,
    StepEngine,
    StepFailedError,
    Timings,
)

log = logging.getLogger(__name__)

Outcome = Generation | BaseException
Emit = Callable[[Sequence[int]], None]  # tokens newly chosen for a streaming request


class Ticket:
    """A submitted request on its way through the scheduler (mutable; the decode thread's view).

    `cancelled_at` and `queued` are the only fields another thread writes (under the scheduler's
    lock; the decode thread reads `cancelled_at` without).
    """

    def __init__(self, request: Request, emit: Emit, settle: Callable[[Outcome], None], now: float) -> None:
        self.request = request
        self.emit = emit  # called from the decode thread with new token ids (stream requests only)
        self.settle = settle  # called exactly once, from the decode thread, with the outcome
        self.submitted_at = now
        self.cancelled_at: float | None = None  # when the submitter cancelled it (the scheduler's clock)
        self.queued = False  # in the scheduler's queue of live waiting requests
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.emitted = 0  # tokens already emitted to the stream

    @property
    def rows(self) -> int:
        """Rows reserved for it: a beam of K counts K."""
        return self.request.options.beam_size

    @property
    def max_slots(self) -> int:
        """The most self-attention cache slots one of its rows can reach."""
        return self.request.options.max_output_tokens

    def leaving(self, now: float, steps: int | None = None) -> Retired | None:
        """The outcome of a request that must leave unfinished, or None: the deadline's if it had
        passed by the time of its cancellation, or by `now` when not cancelled (gRPC cancels a call
        at its deadline: docs/metrics.md, `reason`); else the client's cancellation. `steps`: its
        decoder steps in the batch (None: in the queue), for the deadline's message."""
        deadline, cancelled_at = self.request.deadline, self.cancelled_at
        expired = deadline is not None and (now if cancelled_at is None else cancelled_at) >= deadline
        if expired:
            where = "in the queue" if steps is None else f"after {steps} decoder steps"
            return Retired(self, DeadlineExceededError(f"the deadline passed {where}"), "deadline")
        if cancelled_at is not None:
            return Retired(self, RequestCancelledError("the request was cancelled"), "cancelled")
        return None


@dataclass(frozen=True)
class Retired:
    """A request that left the batch, with its outcome and the metrics reason."""

    ticket: Ticket
    outcome: Outcome
    reason: str  # one of service.metrics.FINISH_REASONS


@dataclass
class _Entry:
    ticket: Ticket
    state: SearchState


class RunningBatch:
    """The running rows of one model and their KV cache."""

    def __init__(self, engine: StepEngine, model: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine, self.model, self.clock = engine, model, clock
        self.bos_id = engine.models[model].dims.bos_id
        self._clear()

    def _clear(self) -> None:
        self.entries: list[_Entry] = []
        self.steps_since_admit = 0  # decoder steps since newcomers last joined
        self.tokens = np.zeros(0, dtype=np.int64)  # (R,) the token each row feeds next
        # Self- and cross-attention K/V of the R rows. A fresh one, not an emptied one: after a failed
        # step the old cache may hold a slot the rows never got.
        self.cache: BatchCache = self.engine.new_cache(self.model)

    # --- accounting ----------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows of the next step (live beams)."""
        return len(self.tokens)

    @property
    def reserved_rows(self) -> int:
        return sum(e.ticket.rows for e in self.entries)

    @property
    def max_slots(self) -> int:
        return max((e.ticket.max_slots for e in self.entries), default=0)

    @property
    def kv_tokens(self) -> int:
        """Self-attention cache slots held now: rows × the cache's slot capacity."""
        return self.cache.kv_tokens

    def __len__(self) -> int:
        return len(self.entries)

    # --- retire --------------------------------------------------------------------------------------

    def retire(self, now: float) -> list[Retired]:
        """Drop the cancelled requests and those past their deadline; their rows leave at once."""
        gone: list[Retired] = []
        keep_rows: list[int] = []
        kept: list[_Entry] = []
        first = 0
        for e in self.entries:
            n = len(e.state.live)
            leaving = e.ticket.leaving(now, e.state.step)
            if leaving is not None:
                gone.append(leaving)
            else:
                kept.append(e)
                keep_rows.extend(range(first, first + n))
            first += n
        if gone:
            rows = np.asarray(keep_rows, dtype=np.int64)
            self._keep(kept, rows, self.tokens[rows])
        return gone

    def _keep(self, entries: list[_Entry], rows: np.ndarray, tokens: np.ndarray) -> None:
        """Keep `entries`, whose rows are `rows` of the current cache (in order, repeats for
        beams that branch), feeding `tokens` next."""
        if not entries:
            self._clear()
            return
        self.entries, self.tokens = entries, tokens
        self.cache.keep(rows)

    # --- admit ---------------------------------------------------------------------------------------

    def admit(self, tickets: Sequence[Ticket]) -> list[Retired]:
        """Encode the newcomers in one call and merge them into the batch (their first step is next).

        Returns the newcomers that ended already: a zero length limit, or an encoder failure
        (StepFailedError for exactly these newcomers; the running rows are untouched).
        """
        now = self.clock()
        if tickets:
            self.steps_since_admit = 0
        done: list[Retired] = []
        joining: list[_Entry] = []
        for t in tickets:
            t.admitted_at = now
            state = start_search(t.request.options)
            if state.done:  # max_output_tokens 0: nothing to decode
                done.append(Retired(t, finished(t, state, now), _reason(state)))
            else:
                joining.append(_Entry(t, state))
        if not joining:
            return done
        try:
            cross = self.engine.encode(self.model, [e.ticket.request.source for e in joining])
        except Exception as err:
            log.exception("encoder failed for %d request(s) of model %s", len(joining), self.model)
            failure = StepFailedError(f"the encoder failed: {type(err).__name__}: {err}")
            return done + [Retired(e.ticket, failure, "error") for e in joining]
        self.cache.append(cross)
        self.entries = self.entries + joining
        self.tokens = np.r_[self.tokens, np.full(len(joining), self.bos_id, dtype=np.int64)]
        return done

    # --- step ----------------------------------------------------------------------------------------

    def step(self) -> list[Retired]:
        """One decoder step for every row, then each request's search moves on.

        Returns the requests that finished. When the engine (or a search) raises, every request
        of the batch fails with StepFailedError, the batch is cleared and the error is logged.
        """
        assert self.entries, "step() of an empty batch"
        self.steps_since_admit += 1
        try:
            states = [e.state for e in self.entries]
            log_probs = self.engine.step(self.model, self.tokens, self.cache)
            now = self.clock()
            moved = advance_rows(states, log_probs)
            for e, state in zip(self.entries, moved.states, strict=True):
                e.state = state
        except Exception as err:
            log.exception("decoder step failed for %d request(s) of model %s", len(self.entries), self.model)
            failure = StepFailedError(f"a decoder step failed: {type(err).__name__}: {err}")
            failed = [Retired(e.ticket, failure, "error") for e in self.entries]
            self._clear()
            return failed
        gone: list[Retired] = []
        for e in self.entries:
            if e.ticket.first_token_at is None:
                e.ticket.first_token_at = now
            if e.state.done:
                gone.append(Retired(e.ticket, finished(e.ticket, e.state, now), _reason(e.state)))
            elif e.ticket.request.stream and e.ticket.request.options.beam_size == 1:
                _emit_upto(e.ticket, e.state.live[0].tokens)
        survivors = [e for e in self.entries if not e.state.done]
        self._keep(survivors, moved.parents, moved.tokens)
        return gone


def finished(ticket: Ticket, state: SearchState, now: float) -> Generation:
    """The Generation of a request whose search is done (emitting the stream's last tokens)."""
    hyps = state.hypotheses()
    best = hyps[0]
    if ticket.request.stream:
        _emit_upto(ticket, best.tokens)
    admitted = ticket.admitted_at if ticket.admitted_at is not None else now
    first = ticket.first_token_at
    return Generation(
        hypotheses=tuple(hyps),
        finish_reason=FinishReason.END_OF_SEQUENCE if best.finished else FinishReason.LENGTH,
        input_tokens=len(ticket.request.source),
        output_tokens=len(best.tokens),
        steps=state.step,
        timings=Timings(
            queue_wait_s=admitted - ticket.submitted_at,
            time_to_first_token_s=None if first is None else first - ticket.submitted_at,
            decode_s=now - admitted,
        ),
    )


def _emit_upto(ticket: Ticket, tokens: Sequence[int]) -> None:
    if len(tokens) > ticket.emitted:
        ticket.emit(tuple(tokens[ticket.emitted :]))
        ticket.emitted = len(tokens)


def _reason(state: SearchState) -> str:
    return "end_of_sequence" if state.hypotheses()[0].finished else "length"
