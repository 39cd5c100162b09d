"""service/metrics.py: conventional names, each method moves exactly its series, bounded labels."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from service.metrics import (
    EXPECTED_CODES,
    FINISH_REASONS,
    LATENCY_BUCKETS,
    PREFIX,
    REJECT_REASONS,
    RPCS,
    STEP_BUCKETS,
    Metrics,
    ServedModel,
    serve_metrics,
)
from service.modeldir.manifest import GRAPH_NAMES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
# Histograms that do not measure time, and so rightly lack the `_seconds` suffix.
UNITLESS_HISTOGRAMS = {"translator_decode_step_batch_size"}

Series = tuple[str, frozenset[tuple[str, str]]]  # (sample name, labels)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def snapshot(registry: CollectorRegistry) -> dict[Series, float]:
    """Every sample's value, except the `_created` timestamps."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def touched(registry: CollectorRegistry, action: Callable[[], None]) -> set[tuple[str, tuple[str, ...]]]:
    """The series `action` changed or created, as (metric, label values); histogram samples are
    folded into their series (`_bucket`, `_count` and `_sum`, the `le` label dropped)."""
    before = snapshot(registry)
    action()
    after = snapshot(registry)
    changed = set()
    for (name, labels), value in after.items():
        if before.get((name, labels), 0.0) != value:
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            values = tuple(v for k, v in sorted(labels) if k != "le")
            changed.add((base, values))
    return changed


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Metric names as a scrape shows them (counters with their `_total`)."""
    return {f.name + "_total" if f.type == "counter" else f.name for f in registry.collect()}


# Names and declarations


def test_names_follow_the_prometheus_conventions(registry: CollectorRegistry, metrics: Metrics) -> None:
    for family in registry.collect():
        assert family.name.startswith(PREFIX), family.name
        assert family.documentation.strip(), f"{family.name} has no help text"
        assert family.type in {"counter", "gauge", "histogram"}, family.name  # never a summary
        if family.type == "counter":
            values = {s.name for s in family.samples if not s.name.endswith("_created")}
            assert values <= {family.name + "_total"}, family.name
        else:
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram" and family.name not in UNITLESS_HISTOGRAMS:
            assert family.name.endswith("_seconds"), family.name
        for unit in ("_milliseconds", "_ms", "_minutes", "_bytes_kb"):
            assert unit not in family.name, family.name  # base units only


def test_every_metric_the_design_asks_for_is_declared(registry: CollectorRegistry, metrics: Metrics) -> None:
    assert {
        "translator_requests_total",
        "translator_request_duration_seconds",
        "translator_queue_wait_seconds",
        "translator_time_to_first_token_seconds",
        "translator_time_per_output_token_seconds",
        "translator_input_tokens_total",
        "translator_output_tokens_total",
        "translator_decode_step_batch_size",
        "translator_decode_step_duration_seconds",
        "translator_sequences_in_flight",
        "translator_queue_depth",
        "translator_kv_cache_used_tokens",
        "translator_kv_cache_capacity_tokens",
        "translator_onnxruntime_run_duration_seconds",
        "translator_model_info",
    } <= exposed_names(registry)


def test_the_docs_table_lists_exactly_the_declared_metrics(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    documented = re.findall(r"^\| `(translator_\w+)` \|", DOCS.read_text(), flags=re.MULTILINE)
    assert sorted(documented) == sorted(exposed_names(registry))  # each metric in one row, once


def test_buckets_span_the_ranges_of_this_service(registry: CollectorRegistry, metrics: Metrics) -> None:
    assert (LATENCY_BUCKETS[0], LATENCY_BUCKETS[-1]) == (0.001, 30.0)
    assert (STEP_BUCKETS[0], STEP_BUCKETS[-1]) == (0.0001, 1.0)
    bounds = {
        s.labels["le"]
        for s in next(f for f in registry.collect() if f.name == "translator_decode_step_batch_size").samples
        if s.name.endswith("_bucket")
    }
    assert bounds == {str(float(2**i)) for i in range(9)} | {"+Inf"}


def test_metrics_register_in_the_given_registry_only() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Metrics(first)
    Metrics(second)  # nothing went to the global registry, so a second instance is fine
    assert not {f.name for f in REGISTRY.collect()} & {f.name for f in first.collect()}
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(first)  # but one registry holds one set of metrics


# Series that exist before any traffic


def test_request_series_exist_at_zero_for_every_rpc_and_expected_code(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    for rpc in RPCS:
        assert registry.get_sample_value("translator_request_duration_seconds_count", {"rpc": rpc}) == 0
        for code in EXPECTED_CODES:
            labels = {"rpc": rpc, "code": code.name}
            assert registry.get_sample_value("translator_requests_total", labels) == 0, labels
    assert len(RPCS) * len(EXPECTED_CODES) == 32


def test_reason_and_graph_series_exist_at_zero(registry: CollectorRegistry, metrics: Metrics) -> None:
    for reason in REJECT_REASONS:
        assert registry.get_sample_value("translator_requests_rejected_total", {"reason": reason}) == 0
    for reason in FINISH_REASONS:
        assert registry.get_sample_value("translator_sequences_finished_total", {"reason": reason}) == 0
    for graph in GRAPH_NAMES:
        labels = {"graph": graph}
        assert registry.get_sample_value("translator_onnxruntime_run_duration_seconds_count", labels) == 0
    for name in (
        "translator_input_tokens_total",
        "translator_output_tokens_total",
        "translator_queue_wait_seconds_count",
        "translator_decode_step_batch_size_count",
        "translator_sequences_in_flight",
        "translator_queue_depth",
        "translator_kv_cache_used_tokens",
        "translator_kv_cache_capacity_tokens",
    ):
        assert registry.get_sample_value(name) == 0, name


# Each method moves exactly its series


def test_request_finished(registry: CollectorRegistry, metrics: Metrics) -> None:
    changed = touched(registry, lambda: metrics.request_finished("Attend", grpc.StatusCode.NOT_FOUND, 0.02))
    assert changed == {
        ("translator_requests_total", ("NOT_FOUND", "Attend")),
        ("translator_request_duration_seconds", ("Attend",)),
    }
    assert registry.get_sample_value("translator_requests_total", {"rpc": "Attend", "code": "NOT_FOUND"}) == 1
    duration = {"rpc": "Attend"}
    assert registry.get_sample_value("translator_request_duration_seconds_sum", duration) == 0.02
    assert (
        registry.get_sample_value("translator_request_duration_seconds_bucket", {**duration, "le": "0.01"})
        == 0
    )
    assert (
        registry.get_sample_value("translator_request_duration_seconds_bucket", {**duration, "le": "0.025"})
        == 1
    )


def test_request_finished_counts_a_code_that_is_not_pre_initialised(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.request_finished("Translate", grpc.StatusCode.UNIMPLEMENTED, 0.001)
    labels = {"rpc": "Translate", "code": "UNIMPLEMENTED"}
    assert registry.get_sample_value("translator_requests_total", labels) == 1


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda m: m.request_rejected("queue_full"),
            {("translator_requests_rejected_total", ("queue_full",))},
        ),
        (lambda m: m.sequence_finished("deadline"), {("translator_sequences_finished_total", ("deadline",))}),
        (lambda m: m.observe_queue_wait(0.3), {("translator_queue_wait_seconds", ())}),
        (lambda m: m.observe_time_to_first_token(0.05), {("translator_time_to_first_token_seconds", ())}),
        (
            lambda m: m.observe_time_per_output_token(0.004),
            {("translator_time_per_output_token_seconds", ())},
        ),
        (lambda m: m.add_tokens(input_tokens=7), {("translator_input_tokens_total", ())}),
        (lambda m: m.add_tokens(output_tokens=3), {("translator_output_tokens_total", ())}),
        (
            lambda m: m.observe_step(12, 0.008),
            {("translator_decode_step_batch_size", ()), ("translator_decode_step_duration_seconds", ())},
        ),
        (lambda m: m.set_in_flight(5), {("translator_sequences_in_flight", ())}),
        (lambda m: m.set_queue_depth(9), {("translator_queue_depth", ())}),
        (
            lambda m: m.set_kv_cache(1200, 65536),
            {("translator_kv_cache_used_tokens", ()), ("translator_kv_cache_capacity_tokens", ())},
        ),
        (
            lambda m: m.observe_graph_run("decoder_step", 0.002),
            {("translator_onnxruntime_run_duration_seconds", ("decoder_step",))},
        ),
    ],
)
def test_each_method_changes_only_its_series(
    registry: CollectorRegistry,
    metrics: Metrics,
    call: Callable[[Metrics], None],
    expected: set[tuple[str, tuple[str, ...]]],
) -> None:
    assert touched(registry, lambda: call(metrics)) == expected


def test_values_land_where_they_should(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.add_tokens(input_tokens=7, output_tokens=3)
    metrics.add_tokens(output_tokens=2)
    metrics.observe_step(12, 0.008)
    metrics.set_kv_cache(1200, 65536)
    metrics.set_in_flight(5)
    metrics.set_in_flight(4)  # a gauge holds the latest value
    value = registry.get_sample_value
    assert value("translator_input_tokens_total") == 7
    assert value("translator_output_tokens_total") == 5
    assert value("translator_decode_step_batch_size_bucket", {"le": "8.0"}) == 0
    assert value("translator_decode_step_batch_size_bucket", {"le": "16.0"}) == 1
    assert value("translator_decode_step_duration_seconds_sum") == 0.008
    assert value("translator_kv_cache_used_tokens") == 1200
    assert value("translator_kv_cache_capacity_tokens") == 65536
    assert value("translator_sequences_in_flight") == 4


def test_model_info_is_one_series_per_served_model_and_replaced_on_reload(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    def labels(name: str, version: str) -> dict[str, str]:
        return {
            "model": name,
            "model_version": version,
            "variant": "fp32",
            "execution_provider": "CPUExecutionProvider",
            "build_version": "0.1.0",
        }

    def served(name: str, version: str) -> ServedModel:
        return ServedModel(name, version, "fp32", "CPUExecutionProvider")

    metrics.set_model_info([served("en-fr-small", "1.0.0"), served("en-de", "2.0")], build_version="0.1.0")
    assert registry.get_sample_value("translator_model_info", labels("en-de", "2.0")) == 1
    metrics.set_model_info([served("en-fr-small", "1.1.0")], build_version="0.1.0")
    assert registry.get_sample_value("translator_model_info", labels("en-fr-small", "1.1.0")) == 1
    assert registry.get_sample_value("translator_model_info", labels("en-fr-small", "1.0.0")) is None
    family = next(f for f in registry.collect() if f.name == "translator_model_info")
    assert len(family.samples) == 1


# Bounded labels


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.request_finished("Translat", grpc.StatusCode.OK, 0.1),
        lambda m: m.request_finished("req-1234", grpc.StatusCode.OK, 0.1),
        lambda m: m.request_finished("Translate", "OK", 0.1),
        lambda m: m.observe_graph_run("decoder", 0.1),
        lambda m: m.request_rejected("too many"),
        lambda m: m.sequence_finished("eos"),
        lambda m: m.add_tokens(output_tokens=-1),
        lambda m: m.observe_step(0, 0.1),
    ],
)
def test_unknown_label_values_and_impossible_counts_are_refused_without_new_series(
    registry: CollectorRegistry, metrics: Metrics, call: Callable[[Metrics], None]
) -> None:
    before = snapshot(registry)
    with pytest.raises(ValueError):
        call(metrics)
    assert snapshot(registry) == before


# The HTTP endpoint


def test_serve_metrics_exposes_the_text_format_on_a_loopback_port(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.request_finished("Translate", grpc.StatusCode.OK, 0.2)
    endpoint = serve_metrics(registry, "127.0.0.1", 0)
    try:
        assert endpoint.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as response:
            content_type = response.headers["Content-Type"]
            body = response.read().decode()
    finally:
        endpoint.close()
    assert content_type.startswith("text/plain")
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        assert f"# HELP {name} {family.documentation}\n" in body
        assert f"# TYPE {name} {family.type}\n" in body
    assert 'translator_requests_total{code="OK",rpc="Translate"} 1.0' in body
    assert not endpoint.thread.is_alive()


def test_a_connection_that_stalls_mid_request_is_closed_quietly_and_others_are_served(
    registry: CollectorRegistry, metrics: Metrics, capfd: pytest.CaptureFixture[str]
) -> None:
    """Slowloris: a client that sends half a request and waits held a thread and a file descriptor
    of the process for as long as it liked; now the idle timeout ends it, with no traceback."""
    endpoint = serve_metrics(registry, "127.0.0.1", 0, idle_timeout_s=0.2)
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=30) as stalled:
            stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
            with urllib.request.urlopen(url, timeout=30) as response:  # meanwhile, a good client
                assert response.status == 200
            assert stalled.recv(1024) == b""  # closed by the server (a hang here raises TimeoutError)
    finally:
        endpoint.close()
    assert "Traceback" not in capfd.readouterr().err
