"""Every Prometheus metric the server exports, declared once, and the HTTP endpoint that serves them.

`Metrics` owns the metric objects and registers them in the `CollectorRegistry` it is given (the
server passes its own; each test passes a fresh one), so nothing here touches prometheus-client's
global registry. The rest of the service never handles a metric object: it calls the typed
methods below (`request_finished`, `observe_step`, `set_queue_depth`, ...), which keep the label
values inside small fixed sets. An unknown RPC, graph or reason is a ValueError, not a new time
series: label values come from code, never from a request, so the number of series is bounded.

Conventions (https://prometheus.io/docs/practices/naming/): every name starts with `translator_`;
durations are in seconds and end in `_seconds`; counters end in `_total`; distributions are
histograms (aggregatable across replicas, unlike summaries). docs/metrics.md lists the metrics;
a test keeps that table and this module in agreement.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from service.modeldir.manifest import GRAPH_NAMES

PREFIX = "translator_"

_AcrossWorkers = Literal["livesum", "livemax"]

RPCS = ("Translate", "TranslateStream", "Attend", "GetModelInfo")
# The codes the servicer returns by design; their series exist at 0 from start-up so that a rate()
# or an alert on, say, RESOURCE_EXHAUSTED works before the first one happens. Any other grpc
# StatusCode is still counted (the set is bounded by the enum), just not pre-initialised.
EXPECTED_CODES = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
)
# Why a request was turned away before it was queued (its status is RESOURCE_EXHAUSTED for
# queue_full and expected_wait, UNAVAILABLE for the other two).
REJECT_REASONS = ("queue_full", "expected_wait", "draining", "not_ready")
# Why a request left the scheduler (the queue or the running batch); one count per request, whatever
# its number of beams.
FINISH_REASONS = ("end_of_sequence", "length", "cancelled", "deadline", "error")

# Whole requests, queue waits and the first token: from about 1 ms (a cached GetModelInfo, an idle
# queue) to 30 s (a long beam search under load).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One decoder step, one graph run, the time between two output tokens: 0.1 ms to 1 s.
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Rows (sequences; a beam search contributes one per beam) in one decoder step.
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(9))  # 1, 2, 4, ..., 256


class Metrics:
    """The service's metrics, registered in `registry`; one instance per server process.

    Every method is thread-safe (prometheus-client locks each value), so the scheduler's loop
    thread and the gRPC handlers can call them concurrently.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._instances_lock = threading.Lock()
        self._instance_values: dict[int, dict[int, float]] = {}  # id(gauge) → instance → value
        self._model_info_set = False

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            # prometheus-client appends `_total` to a counter's samples itself.
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(
            name: str, doc: str, labels: tuple[str, ...] = (), *, across_workers: _AcrossWorkers = "livesum"
        ) -> Gauge:
            # How prometheus-client's multiprocess mode (several worker processes, service/workers.py)
            # combines the workers' values: sums of the live ones; ignored in a lone process.
            return Gauge(PREFIX + name, doc, labels, registry=registry, multiprocess_mode=across_workers)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=registry, buckets=buckets)

        self._requests = counter(
            "requests", "RPCs that ended, by method and gRPC status code.", ("rpc", "code")
        )
        self._request_duration = histogram(
            "request_duration_seconds",
            "Time from receiving an RPC to its last response message or error, by method.",
            LATENCY_BUCKETS,
            ("rpc",),
        )
        self._rejected = counter(
            "requests_rejected", "Requests turned away before queueing, by reason.", ("reason",)
        )
        self._finished = counter(
            "sequences_finished",
            "Requests that left the scheduler (the queue or the running batch), by finish reason (one per "
            "request, all beams).",
            ("reason",),
        )
        self._queue_wait = histogram(
            "queue_wait_seconds",
            "Time a request waited in the queue before it joined the running batch.",
            LATENCY_BUCKETS,
        )
        self._time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Time from receiving a request to its first output token being chosen.",
            LATENCY_BUCKETS,
        )
        self._time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Mean time between the consecutive output tokens (decoder steps) of a request, one "
            "observation per translation.",
            STEP_BUCKETS,
        )
        self._input_tokens = counter("input_tokens", "Source tokens admitted for translation.")
        self._output_tokens = counter(
            "output_tokens",
            "Target tokens of the translations returned, end token included (a beam search: its best "
            "hypothesis).",
        )
        self._step_batch_size = histogram(
            "decode_step_batch_size",
            "Rows (sequences, one per beam) in each decoder step.",
            BATCH_SIZE_BUCKETS,
        )
        self._step_duration = histogram(
            "decode_step_duration_seconds",
            "Wall time of one decoder step: the graph run plus choosing the next tokens.",
            STEP_BUCKETS,
        )
        self._in_flight = gauge(
            "sequences_in_flight", "Requests being decoded in the running batch (all beams count once)."
        )
        self._queue_depth = gauge("queue_depth", "Requests waiting to join the running batch.")
        self._kv_used = gauge(
            "kv_cache_used_tokens",
            "Self-attention cache slots held by running rows (rows x the batch's slot capacity, in chunks).",
        )
        self._kv_capacity = gauge(
            "kv_cache_capacity_tokens", "KV-cache tokens the scheduler may admit work up to."
        )
        self._graph_run = histogram(
            "onnxruntime_run_duration_seconds",
            "Wall time of one onnxruntime InferenceSession.run, by graph.",
            STEP_BUCKETS,
            ("graph",),
        )
        self._model_info = gauge(
            "model_info",
            "Always 1; the labels describe the model being served and the server build.",
            ("model", "model_version", "variant", "execution_provider", "build_version"),
            across_workers="livemax",  # every worker serves the same models: 1, not the worker count
        )

        for rpc in RPCS:
            self._request_duration.labels(rpc)
            for code in EXPECTED_CODES:
                self._requests.labels(rpc, code.name)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        # The labelled children the hot paths use (every decoder step, every request), looked up
        # once: `labels()` takes a lock and validates its arguments at every call.
        self._finished_by_reason = {reason: self._finished.labels(reason) for reason in FINISH_REASONS}
        self._graph_run_by_graph = {graph: self._graph_run.labels(graph) for graph in GRAPH_NAMES}

    # Requests

    def request_finished(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one ended RPC under its status code and observe its duration.

        Raises:
            ValueError: `rpc` is not one of RPCS, or `code` is not a grpc.StatusCode.
        """
        _check(rpc, RPCS, "rpc")
        if not isinstance(code, grpc.StatusCode):
            raise ValueError(f"code must be a grpc.StatusCode, got {code!r}")
        self._requests.labels(rpc, code.name).inc()
        self._request_duration.labels(rpc).observe(seconds)

    def request_rejected(self, reason: str) -> None:
        """Count one request refused before queueing; `reason` is one of REJECT_REASONS."""
        _check(reason, REJECT_REASONS, "reject reason")
        self._rejected.labels(reason).inc()

    def sequence_finished(self, reason: str) -> None:
        """Count one request leaving the scheduler; `reason` is one of FINISH_REASONS."""
        _child(self._finished_by_reason, reason, "finish reason").inc()

    def observe_queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def observe_time_to_first_token(self, seconds: float) -> None:
        self._time_to_first_token.observe(seconds)

    def observe_time_per_output_token(self, seconds: float) -> None:
        self._time_per_output_token.observe(seconds)

    def add_tokens(self, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add to the token counters (at admission for input; for output, when a request ends with a
        translation: its tokens as Translation.output_tokens counts them, end token included).

        Raises:
            ValueError: a count is negative (counters only go up).
        """
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {input_tokens=} {output_tokens=}")
        self._input_tokens.inc(input_tokens)
        self._output_tokens.inc(output_tokens)

    # The scheduler's loop

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """Observe one decoder step over `batch_size` rows that took `seconds`."""
        if batch_size < 1:
            raise ValueError(f"a decoder step runs at least one row, got batch_size={batch_size}")
        self._step_batch_size.observe(batch_size)
        self._step_duration.observe(seconds)

    # With several scheduler instances (--instances) each reports its own value, and the gauge is
    # their sum: the process's figure, whatever the instance count.

    def set_in_flight(self, n: int, *, instance: int = 0) -> None:
        self._set_summed(self._in_flight, instance, n)

    def set_queue_depth(self, n: int, *, instance: int = 0) -> None:
        self._set_summed(self._queue_depth, instance, n)

    def set_kv_cache(self, used_tokens: int, capacity_tokens: int, *, instance: int = 0) -> None:
        self._set_summed(self._kv_used, instance, used_tokens)
        self._set_summed(self._kv_capacity, instance, capacity_tokens)

    def _set_summed(self, gauge: Gauge, instance: int, value: float) -> None:
        with self._instances_lock:
            parts = self._instance_values.setdefault(id(gauge), {})
            if parts.get(instance) == value:  # the scheduler publishes after every step; most change nothing
                return
            parts[instance] = value
            gauge.set(sum(parts.values()))

    # The engine

    def observe_graph_run(self, graph: str, seconds: float) -> None:
        """Observe one onnxruntime run of `graph` (one of service.modeldir.manifest.GRAPH_NAMES)."""
        _child(self._graph_run_by_graph, graph, "graph").observe(seconds)

    def set_model_info(self, served: Sequence[ServedModel], *, build_version: str) -> None:
        """Describe what is being served: one series per model (from its manifest and session),
        all with the package version. Replaces any earlier description, so that a reload leaves
        exactly the models served now."""
        if self._model_info_set:  # (prometheus-client cannot clear series in multiprocess mode,
            self._model_info.clear()  # which worker processes use: they describe theirs once)
        self._model_info_set = bool(served)
        for m in served:
            self._model_info.labels(
                m.model, m.model_version, m.variant, m.execution_provider, build_version
            ).set(1)


@dataclass(frozen=True)
class ServedModel:
    """The `translator_model_info` labels of one served model."""

    model: str
    model_version: str
    variant: str
    execution_provider: str


def _check(value: str, allowed: Iterable[str], what: str) -> None:
    if value not in allowed:
        raise _unknown(value, allowed, what)


def _unknown(value: str, allowed: Iterable[str], what: str) -> ValueError:
    return ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


_Child = TypeVar("_Child")


def _child(children: Mapping[str, _Child], value: str, what: str) -> _Child:
    """The labelled child for `value`; ValueError (as `_check`) for a value not among them."""
    try:
        return children[value]
    except KeyError:
        raise _unknown(value, children, what) from None


@dataclass(frozen=True)
class MetricsServer:
    """The HTTP endpoint serving the text exposition format (every path answers with it)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port: the real one when serve_metrics was asked for port 0."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving, release the socket and wait for the serving thread to end."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def register_process_metrics(registry: CollectorRegistry) -> None:
    """The series prometheus-client's default registry would export, in `registry`: `process_*`
    (CPU seconds, resident and virtual memory, open file descriptors, start time), `python_info`,
    and `python_gc_*` (collections, collected and uncollectable objects per generation).

    For a lone server process only: in multiprocess mode (service/workers.py) they would describe
    the supervisor alone, not the workers that do the work, so that mode leaves them out.
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


# A connection to /metrics that sends or takes nothing for this long is closed. The endpoint serves
# each connection on a thread of its own, and a client that opens connections and never finishes
# its request (slowloris) held a thread and a file descriptor each for as long as it liked: file
# descriptors the gRPC port needs too. A scraper sends its request at once.
METRICS_IDLE_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    """One connection to the endpoint: no access log, and a client that stalls or goes away ends its
    connection quietly (socketserver would print a traceback for it)."""

    timeout = METRICS_IDLE_TIMEOUT_S  # socketserver sets it on each connection

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """No access log: a scrape every few seconds would fill it."""


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, *, idle_timeout_s: float = METRICS_IDLE_TIMEOUT_S
) -> MetricsServer:
    """Serve `registry` over HTTP on its own port, from a daemon thread (prometheus-client's
    `start_http_server`, with a bound on how long a connection may stall).

    Args:
        registry: the registry `Metrics` was built on.
        host: the address to bind ("0.0.0.0" in a container, "127.0.0.1" in tests).
        port: the port to bind; 0 picks a free one (read it back from `.port`).
        idle_timeout_s: a connection that sends or takes nothing for this long is closed.
    Returns:
        The running server; call `close()` on shutdown.
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family  # IPv6 for "::", as start_http_server chooses

    class Handler(_QuietHandler):
        timeout = idle_timeout_s

    server: WSGIServer = make_server(host, port, make_wsgi_app(registry), Server, handler_class=Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
