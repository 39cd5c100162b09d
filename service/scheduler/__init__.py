"""The scheduler layer: the queue and continuous batching between the servicer and the engine.

No grpc and no onnxruntime here. `scheduler` owns the decode thread, `queue` its live waiting
requests, `admission` the expected wait that refuses what cannot wait in time, `batch` the running
batch and its step, `handle` the submitter's side, `types` the contracts with the layers around it,
`pool` the instances of one process. The names below are what the other layers use.
"""

from service.decoding import Hypothesis
from service.scheduler.handle import Handle
from service.scheduler.pool import SchedulerPool, instance_config
from service.scheduler.scheduler import Scheduler, SchedulerStats
from service.scheduler.types import (
    DeadlineExceededError,
    FinishReason,
    Generation,
    QueueFullError,
    QueueTooSlowError,
    Request,
    RequestCancelledError,
    RequestTooLargeError,
    SchedulerClosedError,
    SchedulerError,
    StepEngine,
    StepFailedError,
    Timings,
)

__all__ = [
    "DeadlineExceededError",
    "FinishReason",
    "Generation",
    "Handle",
    "Hypothesis",
    "QueueFullError",
    "QueueTooSlowError",
    "Request",
    "RequestCancelledError",
    "RequestTooLargeError",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerError",
    "SchedulerPool",
    "SchedulerStats",
    "StepEngine",
    "StepFailedError",
    "Timings",
    "instance_config",
]
