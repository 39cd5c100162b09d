"""The scheduler's contracts: what a request asks for, what it gets back, and how it can fail.

Small frozen dataclasses cross from the servicer to the scheduler (`Request`) and back
(`Generation`); the outcome errors are specific exceptions that the servicer maps to gRPC codes
(this module imports neither grpc nor onnxruntime). The engine is reached only through the
`StepEngine` protocol, so the scheduler is unit-tested with a fake engine.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.decoding import Hypothesis, SearchOptions
from service.engine.kv_cache import KV, BatchCache

# --- requests and results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One sentence to decode."""

    model: str  # the engine's name for the model (the servicer resolves the default one)
    source: tuple[int, ...]  # source token ids, ending with the end token, unpadded
    options: SearchOptions  # greedy or beam, length limit, n-best
    deadline: float | None = None  # time.monotonic() after which the request is dropped; None: never
    stream: bool = False  # deliver tokens through `Handle.tokens()` as they are chosen


class FinishReason(enum.Enum):
    """Why the best hypothesis stopped."""

    END_OF_SEQUENCE = "end_of_sequence"  # it produced the end token
    LENGTH = "length"  # it reached max_output_tokens


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds (time.monotonic differences)."""

    queue_wait_s: float  # from submit to joining the running batch
    time_to_first_token_s: float | None  # from submit to its first decoder step's token; None: no step ran
    decode_s: float  # from joining the running batch to the end


@dataclass(frozen=True)
class Generation:
    """A request's result: its n-best hypotheses and how it went."""

    hypotheses: tuple[Hypothesis, ...]  # options.n_best of them, best first
    finish_reason: FinishReason  # of the best hypothesis
    input_tokens: int  # source tokens
    output_tokens: int  # tokens of the best hypothesis (without the end token)
    steps: int  # decoder steps the request took part in
    timings: Timings


# --- outcome errors ----------------------------------------------------------------------------------


class SchedulerError(Exception):
    """Base of the outcomes that are not a Generation."""


class QueueFullError(SchedulerError):
    """The waiting queue is full; the request was not accepted (RESOURCE_EXHAUSTED)."""

    reason = "queue_full"  # of translator_requests_rejected_total

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request queue is full ({limit} waiting, --max-queue-size); retry later")
        self.limit = limit


class QueueTooSlowError(QueueFullError):
    """The queue is full in time: the wait a new request can expect is longer than its deadline
    leaves, or than --max-queue-wait-s (service/scheduler/admission.py); refused at once
    (RESOURCE_EXHAUSTED) rather than left to expire in the queue."""

    reason = "expected_wait"

    def __init__(
        self,
        expected_wait_s: float,
        decode_s: float,
        *,
        time_left_s: float | None = None,
        max_wait_s: float | None = None,
    ) -> None:
        wait = f"the server is overloaded: this request would wait about {expected_wait_s:.2f} s in the queue"
        if time_left_s is not None:
            left = max(0.0, time_left_s)
            why = (
                f"{wait} and decode for about {decode_s:.2f} s, but its deadline leaves {left:.2f} s; "
                "refused now rather than left to expire: retry later, elsewhere or with a longer deadline"
            )
        else:
            why = f"{wait}, over the {max_wait_s:g} s allowed (--max-queue-wait-s); retry later or elsewhere"
        SchedulerError.__init__(self, why)
        self.limit = 0  # no count bound was reached
        self.expected_wait_s, self.time_left_s = expected_wait_s, time_left_s


class RequestTooLargeError(SchedulerError, ValueError):
    """A request that could never fit the scheduler's limits, however empty (INVALID_ARGUMENT)."""


class SchedulerClosedError(SchedulerError):
    """Draining or stopped: no new work, or it stopped before this request ended (UNAVAILABLE)."""


class DeadlineExceededError(SchedulerError):
    """The request's deadline passed before it finished; its rows were dropped (DEADLINE_EXCEEDED)."""


class RequestCancelledError(SchedulerError):
    """The request was cancelled (`Handle.cancel()`); its rows left the batch (CANCELLED)."""


class StepFailedError(SchedulerError):
    """The encoder or a decoder step that this request took part in raised (INTERNAL)."""


# --- what the scheduler needs of an engine ----------------------------------------------------------


class Dims(Protocol):
    @property
    def bos_id(self) -> int: ...


class ModelLike(Protocol):
    @property
    def dims(self) -> Dims: ...


class StepEngine(Protocol):
    """The step-level calls of `service.engine.engine.Engine` that one scheduler iteration makes."""

    @property
    def models(self) -> Mapping[str, ModelLike]: ...

    def encode(self, model: str | None, sources: Sequence[Sequence[int]]) -> KV: ...

    def new_cache(self, model: str | None) -> BatchCache: ...

    def step(self, model: str | None, tokens: np.ndarray, cache: BatchCache) -> np.ndarray: ...
