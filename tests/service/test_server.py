"""The real server on a loopback port: real onnxruntime, the committed model, a gRPC client.

Most tests share one in-process server (tests/service/server_fixture.py); the queue-full test runs a
second one with a tiny queue on the same engine, and the SIGTERM test runs `python -m service` as a
subprocess.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import CollectorRegistry

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.config import EngineConfig, NamedModelDir, ServerConfig
from service.engine.engine import Engine
from service.engine.reference_decoder import translate_texts
from service.modeldir.tokenizer import Tokenizer
from service.rpc.responses import text_delta
from service.server import listen_for_metrics, setup_logging
from tests.service.server_fixture import ServerThread, loopback_config, paced_steps, wait_until

SERVICE = "translator.v1.Translator"
TEXTS = ["I love cats.", "The old man gives the red book to the child.", "We see a small dog."]
ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "en-fr-small"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    with ServerThread(loopback_config(), engine) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.TranslatorStub:
    return pb_grpc.TranslatorStub(channel)


def translate(stub: pb_grpc.TranslatorStub, texts: list[str], **options: object) -> pb.TranslateResponse:
    return stub.Translate(
        pb.TranslateRequest(texts=texts, options=pb.TranslateOptions(**options)), timeout=30
    )


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the error that `call` raises."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


# --- Translate -------------------------------------------------------------------------------------


def test_unary_translations_equal_the_reference_decoder(stub: pb_grpc.TranslatorStub, engine: Engine) -> None:
    expected = translate_texts(engine.graphs(), None, TEXTS)

    single = translate(stub, TEXTS[:1])
    multi = translate(stub, TEXTS)

    assert [t.text for t in single.translations] == expected[:1]
    assert [t.text for t in multi.translations] == expected
    assert (multi.model, multi.model_version) == (engine.default_model, engine.model().version)
    first = multi.translations[0]
    assert first.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE
    (hyp,) = first.hypotheses
    assert hyp.score < 0 and hyp.normalized_score == pytest.approx(hyp.score / first.output_tokens)
    assert (
        first.input_tokens
        == len(Tokenizer.from_file(engine.graphs().model_dir / "tokenizer.json").encode(TEXTS[0])) + 1
    )


def test_beam_search_returns_n_best_ranked_hypotheses(stub: pb_grpc.TranslatorStub, engine: Engine) -> None:
    expected = translate_texts(engine.graphs(), None, TEXTS[1:2], beam_size=4)

    (t,) = translate(
        stub, TEXTS[1:2], beam=pb.BeamSearch(beam_size=4), n_best=3, return_tokens=True
    ).translations

    assert t.text == expected[0] == t.hypotheses[0].text
    assert len(t.hypotheses) == 3
    ranks = [h.normalized_score for h in t.hypotheses]
    assert ranks == sorted(ranks, reverse=True)
    best = t.hypotheses[0]
    assert len(best.tokens) == t.output_tokens and best.tokens[-1].special and best.tokens[-1].piece == "</s>"
    for h in t.hypotheses:  # each token's log-probability at its step; together they are the score
        assert all(tok.logprob <= 0 for tok in h.tokens) and any(tok.logprob < 0 for tok in h.tokens)
        assert sum(tok.logprob for tok in h.tokens) == pytest.approx(h.score, abs=1e-4)


def test_the_request_id_comes_back_in_the_trailers(stub: pb_grpc.TranslatorStub) -> None:
    request = pb.TranslateRequest(texts=TEXTS[:1])
    _, call = stub.Translate.with_call(request, metadata=(("x-request-id", "bug-1234"),), timeout=30)
    assert ("x-request-id", "bug-1234") in call.trailing_metadata()
    _, call = stub.Translate.with_call(request, timeout=30)
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 16  # made up by the server

    with pytest.raises(grpc.RpcError) as failed:
        stub.Translate(pb.TranslateRequest(texts=[]), metadata=(("x-request-id", "bad-1"),), timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "bad-1") in failed.value.trailing_metadata()


@pytest.mark.parametrize("sent", ["x status=OK rpc=Fake", 'a"b', "id,with;punctuation"])
def test_a_request_id_that_could_forge_log_fields_is_replaced(
    stub: pb_grpc.TranslatorStub, sent: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.rpc.servicer")
    metadata = (("x-request-id", sent),)
    _, call = stub.Translate.with_call(pb.TranslateRequest(texts=TEXTS[:1]), metadata=metadata, timeout=30)
    returned = dict(call.trailing_metadata())["x-request-id"]
    assert returned != sent and len(returned) == 16  # made up by the server
    logged = [r.fields["request_id"] for r in caplog.records if hasattr(r, "fields")]
    assert returned in logged and sent not in logged


def test_messages_echo_a_bounded_part_of_what_was_sent(stub: pb_grpc.TranslatorStub) -> None:
    """A 20,000-character model name is NOT_FOUND (not RESOURCE_EXHAUSTED for an oversize trailer),
    its message naming a bounded part of it."""
    with pytest.raises(grpc.RpcError) as err:
        translate(stub, ["I love cats."], model="m" * 20_000)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'mmmm" in err.value.details() and len(err.value.details()) < 400


def test_tokens_timings_prefix_and_seed_are_returned(stub: pb_grpc.TranslatorStub) -> None:
    (t,) = translate(
        stub, TEXTS[:1], target_prefix="Nous", return_tokens=True, return_timings=True
    ).translations
    assert t.text.startswith("Nous")
    assert t.hypotheses[0].tokens[0].forced and not t.hypotheses[0].tokens[-2].forced
    assert 0 < t.timings.queue_seconds <= t.timings.total_seconds
    assert 0 < t.timings.time_to_first_token_seconds <= t.timings.total_seconds
    assert not t.HasField("seed")

    sampling = pb.Sampling(temperature=0.8, seed=7)
    a, b = (translate(stub, TEXTS[:2], sampling=sampling).translations for _ in range(2))
    assert [x.text for x in a] == [x.text for x in b] and [x.seed for x in a] == [7, 7]


# --- a paragraph: its sentences translated as rows of one batch, joined with its spacing ------------

SIX = [
    "I love cats.",
    "The old man gives the red book to the child.",
    "We see a small dog.",
    "The woman reads a new book.",
    "The children eat bread.",
    "We see the big house.",
]
# two spaces, a line break, a blank line, spaces around: all kept
GAPS = ["  ", " ", "  ", "\n", "\n\n", " ", " \n"]
PARAGRAPH = GAPS[0] + "".join(s + g for s, g in zip(SIX, GAPS[1:], strict=True))


def test_a_paragraph_is_its_sentences_translations_joined_with_its_spacing(
    stub: pb_grpc.TranslatorStub,
) -> None:
    alone = [t.text for t in translate(stub, SIX).translations]

    (t,) = translate(stub, [PARAGRAPH], return_tokens=True).translations

    assert t.text == GAPS[0] + "".join(s + g for s, g in zip(alone, GAPS[1:], strict=True))
    assert t.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE
    (hyp,) = t.hypotheses
    assert [tok.special for tok in hyp.tokens].count(True) == 6 and len(hyp.tokens) == t.output_tokens
    assert sum(tok.logprob for tok in hyp.tokens) == pytest.approx(hyp.score, abs=1e-4)
    many = translate(stub, [PARAGRAPH, SIX[0]], beam=pb.BeamSearch(beam_size=4), n_best=2).translations
    assert [len(x.hypotheses) for x in many] == [2, 2] and many[1].text == alone[0]


def test_a_paragraph_over_the_source_limit_is_translated_sentence_by_sentence(
    stub: pb_grpc.TranslatorStub, engine: Engine
) -> None:
    tokenizer = Tokenizer.from_file(engine.graphs().model_dir / "tokenizer.json")
    long = " ".join([LONG] * 6)
    assert len(tokenizer.encode(long)) + 1 > 128

    (t,) = translate(stub, [long]).translations
    (one,) = translate(stub, [LONG]).translations
    assert t.text == " ".join([one.text] * 6) and t.input_tokens == 6 * one.input_tokens

    code, details = status_of(lambda: translate(stub, [long], no_sentence_split=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit of 128" in details


def test_no_sentence_split_translates_the_text_whole_as_before(
    stub: pb_grpc.TranslatorStub, engine: Engine
) -> None:
    text = " ".join(SIX[:3])
    (whole,) = translate(stub, [text], no_sentence_split=True).translations
    assert whole.text == translate_texts(engine.graphs(), None, [text])[0]
    assert (
        whole.input_tokens
        == len(Tokenizer.from_file(engine.graphs().model_dir / "tokenizer.json").encode(text)) + 1
    )


def test_sentences_beyond_the_limits_are_invalid_argument_naming_them(stub: pb_grpc.TranslatorStub) -> None:
    over = "I love cats. " + "the red book " * 50 + "sleeps.\nWe see a small dog."
    code, details = status_of(lambda: translate(stub, [SIX[0], over]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(
        r"text 1, sentence 2 of 3: input is \d+ tokens \(end token included\), longer than "
        "the limit of 128",
        details,
    ), details

    code, details = status_of(lambda: translate(stub, ["I love cats. " * 200, "We see a dog. " * 57]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("257 sentences in one request, more than the limit of 256")
    assert "--max-sentences-per-request" in details


# --- TranslateStream -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "Le"])
def test_stream_deltas_concatenate_to_the_unary_result(stub: pb_grpc.TranslatorStub, prefix: str) -> None:
    options = pb.TranslateOptions(target_prefix=prefix, return_tokens=True)
    (unary,) = stub.Translate(pb.TranslateRequest(texts=TEXTS[1:2], options=options), timeout=30).translations

    messages = list(
        stub.TranslateStream(pb.TranslateStreamRequest(text=TEXTS[1], options=options), timeout=30)
    )

    *deltas, final = messages
    assert all(m.WhichOneof("event") == "delta" for m in deltas) and final.WhichOneof("event") == "final"
    assert "".join(m.delta.text for m in deltas) == unary.text == final.final.translations[0].text
    ids = [i for m in deltas for i in m.delta.token_ids]
    assert ids == [tok.id for tok in unary.hypotheses[0].tokens if not tok.special]
    assert final.final.translations[0] == unary or final.final.translations[0].text == unary.text


def test_a_paragraph_streams_sentence_after_sentence_with_its_spacing(stub: pb_grpc.TranslatorStub) -> None:
    (unary,) = translate(stub, [PARAGRAPH]).translations

    *deltas, final = list(stub.TranslateStream(pb.TranslateStreamRequest(text=PARAGRAPH), timeout=30))

    assert "".join(m.delta.text for m in deltas) == unary.text == final.final.translations[0].text
    # the spacing comes as deltas of its own, between the sentences' tokens
    spacing = [m.delta.text for m in deltas if not m.delta.token_ids and m.delta.text]
    assert spacing == GAPS
    assert final.final.translations[0].output_tokens == unary.output_tokens


def test_text_delta_holds_back_a_partial_utf8_character(engine: Engine) -> None:
    tokenizer = Tokenizer.from_file(engine.graphs().model_dir / "tokenizer.json")
    ids = tokenizer.encode(" 日本")  # byte-level pieces: 日 and 本 are 3 bytes each
    sent, deltas = "", []
    for n in range(1, len(ids) + 1):
        deltas.append(text_delta(tokenizer, ids[:n], sent))
        sent += deltas[-1]
    assert deltas == [" ", "", "", "日", "", "", "本"]


def test_stream_refuses_beam_search(stub: pb_grpc.TranslatorStub) -> None:
    request = pb.TranslateStreamRequest(
        text="I love cats.", options=pb.TranslateOptions(n_best=2, beam=pb.BeamSearch())
    )
    code, details = status_of(lambda: list(stub.TranslateStream(request, timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "n_best" in details


# --- Attend, GetModelInfo ---------------------------------------------------------------------------


def test_attend_rows_sum_to_one_and_align_every_target_token(stub: pb_grpc.TranslatorStub) -> None:
    kinds = [pb.ATTENTION_KIND_CROSS, pb.ATTENTION_KIND_ENCODER_SELF, pb.ATTENTION_KIND_DECODER_SELF]
    response = stub.Attend(
        pb.AttendRequest(source="I love cats.", kinds=kinds, heads=[1], average_heads=True), timeout=30
    )

    assert response.target == "J'aime les chats."
    assert response.source_tokens[-1] == response.target_tokens[-1] == "</s>"
    assert len(response.alignment) == len(response.target_tokens)
    assert all(0 <= a < len(response.source_tokens) for a in response.alignment)
    assert len(response.matrices) == 3 * 3 * 2  # kinds × layers × (head 1, mean)
    assert [m.kind for m in response.matrices[:6]] == [pb.ATTENTION_KIND_CROSS] * 6
    assert [(m.layer, m.HasField("head")) for m in response.matrices[:2]] == [(0, True), (0, False)]
    for m in response.matrices:
        rows = np.array(m.values).reshape(m.rows, m.cols)
        np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-3)


def test_attend_with_a_given_target_and_checked_ranges(stub: pb_grpc.TranslatorStub) -> None:
    response = stub.Attend(
        pb.AttendRequest(source="I love cats.", target="J'aime les chiens.", layers=[2]), timeout=30
    )
    assert response.target == "J'aime les chiens."
    (matrix,) = response.matrices
    assert (matrix.layer, matrix.rows, matrix.cols) == (
        2,
        len(response.target_tokens),
        len(response.source_tokens),
    )

    code, details = status_of(lambda: stub.Attend(pb.AttendRequest(source="Hi.", heads=[9]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4 heads" in details
    code, details = status_of(lambda: stub.Attend(pb.AttendRequest(source="Hi.", layers=[3]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "3 layers" in details


def test_attend_reports_a_source_of_several_sentences_per_sentence(stub: pb_grpc.TranslatorStub) -> None:
    def attend(source: str, **fields: object) -> pb.AttendResponse:
        return stub.Attend(pb.AttendRequest(source=source, heads=[1], **fields), timeout=30)

    alone = [attend(s) for s in TEXTS[:2]]

    both = attend(f"{TEXTS[0]}\n{TEXTS[1]}")

    assert both.target == f"{alone[0].target}\n{alone[1].target}"
    assert not (both.matrices or both.alignment or both.source_tokens)  # a map spans one pair
    assert [(s.source, s.target) for s in both.sentences] == [
        (t, a.target) for t, a in zip(TEXTS[:2], alone, strict=True)
    ]
    for sentence, one in zip(both.sentences, alone, strict=True):  # each as if it were attended alone
        assert (sentence.source_tokens, sentence.target_tokens) == (one.source_tokens, one.target_tokens)
        assert list(sentence.matrices) == list(one.matrices) and sentence.alignment == one.alignment

    given = attend(f"{TEXTS[0]} {TEXTS[1]}", target="J'aime les chiens. Le vieil homme lit.")
    assert [s.target for s in given.sentences] == ["J'aime les chiens.", "Le vieil homme lit."]
    assert given.target == "J'aime les chiens. Le vieil homme lit."

    whole = attend(f"{TEXTS[0]} {TEXTS[1]}", no_sentence_split=True)
    assert not whole.sentences and whole.matrices and whole.source_tokens[-1] == "</s>"

    code, details = status_of(lambda: attend(f"{TEXTS[0]} {TEXTS[1]}", target="J'aime les chiens."))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "target has 1 sentences and source 2" in details


def test_get_model_info_describes_the_served_model(stub: pb_grpc.TranslatorStub, engine: Engine) -> None:
    response = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    (model,) = response.models
    assert response.default_model == model.name == engine.default_model
    assert (model.source_language, model.target_language) == ("en", "fr")
    assert (
        model.variant
        == {"int8": pb.MODEL_VARIANT_INT8, "fp32": pb.MODEL_VARIANT_FP32}[engine.model().variant]
    )
    assert model.execution_providers == ["CPUExecutionProvider"]
    assert (model.architecture.decoder_layers, model.architecture.heads) == (3, 4)
    assert (
        model.limits.max_source_tokens,
        model.limits.max_beam_size,
        model.limits.max_texts_per_request,
        model.limits.max_sentences_per_request,
    ) == (128, 8, 64, 256)


# --- health, reflection, metrics --------------------------------------------------------------------


def test_max_connection_age_closes_connections_and_calls_go_on(engine: Engine) -> None:
    config = loopback_config()
    config = replace(config, server=replace(config.server, max_connection_age_s=0.3))
    with ServerThread(config, engine) as aged, grpc.insecure_channel(aged.target) as channel:
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=True)
        stub = pb_grpc.TranslatorStub(channel)
        ready = grpc.ChannelConnectivity.READY
        for _ in range(3):
            assert stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30).translations[0].text
            # state callbacks arrive on gRPC's own thread: wait for READY to be seen first
            assert wait_until(lambda: ready in states), states
            # the GOAWAY at the connection's age takes the channel out of READY (until the next call)
            assert wait_until(lambda: states[-1:] != [ready]), states
        # each GOAWAY takes the channel out of READY; it reconnects for the next call
        assert wait_until(lambda: states.count(ready) >= 2), states


def test_health_reports_serving_and_reflection_lists_the_services(
    server: ServerThread, channel: grpc.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)


def test_once_serving_the_startup_objects_are_out_of_the_collectors_reach(server: ServerThread) -> None:
    # gc.get_objects() lists the tracked objects the collections walk; frozen ones are not among them
    walked = {id(o) for o in gc.get_objects()}
    running = server.running
    assert gc.get_freeze_count() > 0
    assert not {id(running.engine), id(running.scheduler), id(running.servicer)} & walked


def test_the_port_answers_not_serving_while_the_model_loads(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server listens before it loads the model: health says NOT_SERVING and calls are refused
    with UNAVAILABLE (retryable) rather than with a refused connection, until it is warm."""
    loading = threading.Event()

    def slow_load(config: EngineConfig, metrics: object = None) -> Engine:
        loading.wait(30)
        return engine

    monkeypatch.setattr("service.server.Engine", slow_load)
    with socket.socket() as probe:  # a free port, known before the server starts
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = loopback_config()
    server = ServerThread(replace(config, server=replace(config.server, port=port)))
    with ThreadPoolExecutor(1) as pool, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = pool.submit(server.__enter__)
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE)
        assert (
            health.Check(check, timeout=20, wait_for_ready=True).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        stub = pb_grpc.TranslatorStub(channel)
        for call in (
            lambda: stub.Translate(pb.TranslateRequest(texts=["Hello."]), timeout=10),
            lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10),
            lambda: stub.Attend(pb.AttendRequest(source="Hello."), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the server is starting" in err.value.details()
        loading.set()
        started.result(60)
        try:
            assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Translate(pb.TranslateRequest(texts=["Hello."]), timeout=30).translations[0].text
        finally:
            server.__exit__(None, None, None)


def test_metrics_count_requests(server: ServerThread, stub: pb_grpc.TranslatorStub) -> None:
    def scrape() -> float:
        url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        match = re.search(r'translator_requests_total\{code="OK",rpc="GetModelInfo"\} (\S+)', text)
        assert match and "translator_model_info{" in text
        # the standard process and Python series too, as prometheus-client's default registry has them
        for series in ("process_resident_memory_bytes ", "process_cpu_seconds_total ", "python_info{"):
            assert series in text
        assert 'python_gc_collections_total{generation="2"}' in text
        return float(match.group(1))

    before = scrape()
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert scrape() == before + 2


# --- errors -----------------------------------------------------------------------------------------


def test_bad_requests_are_invalid_argument_with_the_limit(stub: pb_grpc.TranslatorStub) -> None:
    code, details = status_of(lambda: translate(stub, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "between 1 and 64" in details
    code, details = status_of(lambda: translate(stub, ["Hi."], beam=pb.BeamSearch(beam_size=9)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit of 8" in details
    code, details = status_of(lambda: translate(stub, ["word " * 200]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "128" in details


def test_an_unknown_model_is_not_found_naming_the_served_ones(stub: pb_grpc.TranslatorStub) -> None:
    code, details = status_of(lambda: translate(stub, ["Hi."], model="de-en"))
    assert code == grpc.StatusCode.NOT_FOUND and "'de-en'" in details and "en-fr-small" in details


def test_a_too_short_deadline_is_deadline_exceeded(stub: pb_grpc.TranslatorStub) -> None:
    options = pb.TranslateOptions(stopping=pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=120))
    request = pb.TranslateRequest(texts=TEXTS * 4, options=options)
    code, _ = status_of(lambda: stub.Translate(request, timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert translate(stub, TEXTS[:1]).translations[0].text  # the server goes on


def requests_ended(running: ServerThread, rpc: str, code: str) -> float:
    """translator_requests_total{rpc, code} of a running server."""
    labels = {"rpc": rpc, "code": code}
    return running.running.metrics.registry.get_sample_value("translator_requests_total", labels) or 0.0


def test_a_full_queue_is_resource_exhausted_and_the_texts_queued_first_are_cancelled(engine: Engine) -> None:
    # one row decoding at a time, two waiting: a long text decodes, another waits, one place is left
    config = loopback_config(instances=1, max_sequences=1, max_queue_size=2)
    long = pb.TranslateOptions(stopping=pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=127))
    with (
        ServerThread(config, engine) as small,
        grpc.insecure_channel(small.target) as ch,
        paced_steps(engine),  # the long text still decodes, however slowly this runs, until cancelled
    ):
        stub = pb_grpc.TranslatorStub(ch)
        scheduler, registry = small.running.scheduler, small.running.metrics.registry
        decoding = stub.Translate.future(pb.TranslateRequest(texts=TEXTS[:1], options=long), timeout=60)
        assert wait_until(lambda: scheduler.stats().in_flight == 1)
        waiting = stub.Translate.future(pb.TranslateRequest(texts=TEXTS[:1], options=long), timeout=60)
        assert wait_until(lambda: scheduler.stats().queued == 1)
        cancelled = {"reason": "cancelled"}
        cancelled_before = registry.get_sample_value("translator_sequences_finished_total", cancelled) or 0.0
        try:
            # its first text takes the last place, its second finds the queue full: retry later
            code, details = status_of(lambda: translate(stub, TEXTS[:2]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in details
            # ... and the first one leaves the queue rather than decoding for nobody
            assert wait_until(
                lambda: (
                    registry.get_sample_value("translator_sequences_finished_total", cancelled)
                    == cancelled_before + 1
                )
            )
            assert scheduler.stats().queued == 1 and scheduler.stats().in_flight == 1
            assert not decoding.done() and not waiting.done()

            # more texts than the whole queue holds could never be accepted: not "retry later"
            code, details = status_of(lambda: translate(stub, TEXTS))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "3 texts in one request, more than the 2" in details and "--max-queue-size" in details
            assert "retry" not in details
        finally:
            decoding.cancel()
            waiting.cancel()


# --- what the server can hold: advertised, accepted up to it, refused beyond -------------------------


@pytest.fixture(scope="module")
def small(engine: Engine) -> Iterator[ServerThread]:
    """A server whose limits bite: 2 instances of 2 rows and 60 KV-cache slots each, 2 waiting
    requests in all, 1 KiB messages."""
    config = loopback_config(instances=2, max_sequences=4, max_kv_cache_tokens=120, max_queue_size=2)
    config = replace(config, server=replace(config.server, max_message_bytes=1024))
    with ServerThread(config, engine) as running:
        yield running


@pytest.fixture(scope="module")
def small_stub(small: ServerThread) -> Iterator[pb_grpc.TranslatorStub]:
    with grpc.insecure_channel(small.target) as channel:
        yield pb_grpc.TranslatorStub(channel)


LONG = "The old man gives the red book to the small child, and the young woman sees the big dog in the park."


def test_get_model_info_advertises_what_a_request_can_get(small_stub: pb_grpc.TranslatorStub) -> None:
    (model,) = small_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).models
    limits = model.limits
    assert (limits.max_batch_size, limits.max_beam_size) == (2, 2)  # one instance's 2 rows, not 4 or 8
    assert limits.max_output_tokens == 60  # a greedy request's slots in one instance's cache, not 128
    assert limits.max_texts_per_request == 2  # what the queue holds, not 64
    assert limits.max_sentences_per_request == 2  # what the queue holds, not 256
    assert limits.max_source_tokens == 128


def test_requests_at_the_advertised_limits_succeed(small_stub: pb_grpc.TranslatorStub) -> None:
    assert len(translate(small_stub, TEXTS[:2]).translations) == 2
    (beam,) = translate(
        small_stub,
        TEXTS[:1],
        beam=pb.BeamSearch(beam_size=2),
        stopping=pb.StoppingCriteria(max_output_tokens=30),
    ).translations
    assert beam.text == "J'aime les chats."
    (greedy,) = translate(small_stub, [LONG], stopping=pb.StoppingCriteria(max_output_tokens=60)).translations
    assert greedy.text
    (default,) = translate(small_stub, [LONG]).translations  # its default is capped at 60 too
    assert 0 < default.output_tokens <= 60


@pytest.mark.parametrize(
    ("texts", "options", "expected"),
    [
        (TEXTS, {}, ["3 texts in one request, more than the 2", "--max-queue-size", "at most 2 texts"]),
        (
            TEXTS[:1],
            {"beam": pb.BeamSearch(beam_size=3)},
            ["beam_size 3 is over the limit of 2", "--max-sequences, which 2 instances split (--instances)"],
        ),
        (
            TEXTS[:1],
            {"stopping": pb.StoppingCriteria(max_output_tokens=61)},
            ["max_output_tokens 61 needs 61 KV-cache slots", "the 60", "--max-kv-cache-tokens", "at most 60"],
        ),
        (  # the default for a long source: named as such, with the number to ask for instead
            [LONG],
            {"beam": pb.BeamSearch(beam_size=2)},
            [
                "text 0: beam_size 2 × max_output_tokens 60 (not set: the default",
                "at most 30 for beam_size 2",
            ],
        ),
    ],
)
def test_requests_beyond_what_the_server_holds_are_invalid_argument(
    small_stub: pb_grpc.TranslatorStub, texts: list[str], options: dict, expected: list[str]
) -> None:
    code, details = status_of(lambda: translate(small_stub, texts, **options))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(part in details for part in expected), details


def _too_large(details: str, message: str) -> bool:
    return (
        re.search(rf"the {message} would be \d+ bytes, over the server's limit of 1024 bytes", details)
        is not None
        and "--max-message-bytes" in details
    )


def test_a_response_over_the_message_limit_is_refused_and_counted_so(
    small: ServerThread, small_stub: pb_grpc.TranslatorStub
) -> None:
    everything = [pb.ATTENTION_KIND_CROSS, pb.ATTENTION_KIND_ENCODER_SELF, pb.ATTENTION_KIND_DECODER_SELF]
    assert small_stub.Attend(pb.AttendRequest(source=TEXTS[0]), timeout=30).matrices  # 3 maps fit
    before = {rpc: requests_ended(small, rpc, "INVALID_ARGUMENT") for rpc in ("Translate", "Attend")}
    ok_before = {rpc: requests_ended(small, rpc, "OK") for rpc in ("Translate", "Attend")}

    code, details = status_of(
        lambda: small_stub.Attend(
            pb.AttendRequest(source=TEXTS[0], kinds=everything, heads=[0, 1]), timeout=30
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and _too_large(details, "AttendResponse")
    assert "fewer attention maps" in details

    stopping = pb.StoppingCriteria(max_output_tokens=60, min_output_tokens=55)
    code, details = status_of(lambda: translate(small_stub, TEXTS[:2], stopping=stopping, return_tokens=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and _too_large(details, "TranslateResponse")
    assert "fewer texts per call" in details

    # counted as what the client got, not as OK
    for rpc in ("Translate", "Attend"):
        assert requests_ended(small, rpc, "INVALID_ARGUMENT") == before[rpc] + 1
        assert requests_ended(small, rpc, "OK") == ok_before[rpc]


def test_a_stream_message_over_the_message_limit_ends_the_stream(small_stub: pb_grpc.TranslatorStub) -> None:
    stopping = pb.StoppingCriteria(max_output_tokens=60, min_output_tokens=55)
    request = pb.TranslateStreamRequest(
        text=TEXTS[0], options=pb.TranslateOptions(stopping=stopping, return_tokens=True)
    )
    received: list[pb.TranslateStreamResponse] = []
    code, details = status_of(lambda: received.extend(small_stub.TranslateStream(request, timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and _too_large(details, "TranslateStreamResponse")
    assert received and all(
        m.WhichOneof("event") == "delta" for m in received
    )  # the deltas fit; the final not


# --- bytes that are not a request ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rpc", "data", "fault"),
    [
        ("Translate", b"\x0a\x03\xff\xfe\x41", "String field had bad UTF-8"),  # texts[0]: not UTF-8
        ("Translate", b"\xff\xff\xff\xff", "Wire format was corrupt"),
        ("TranslateStream", b"\x0a\x02\xc3\x28", "String field had bad UTF-8"),  # text
        ("TranslateStream", b"\xff\xff\xff\xff", "Wire format was corrupt"),
        ("Attend", b"\x12\x02\xc3\x28", "String field had bad UTF-8"),  # source
        ("GetModelInfo", b"\xff\xff\xff\xff", "Wire format was corrupt"),
    ],
)
def test_request_bytes_that_do_not_decode_are_invalid_argument_counted_and_logged_once(
    server: ServerThread,
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
    rpc: str,
    data: bytes,
    fault: str,
) -> None:
    caplog.set_level(logging.INFO, logger="service.rpc.servicer")
    method = f"/{SERVICE}/{rpc}"
    same = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    metadata = (("x-request-id", f"raw-{rpc}-{data.hex()}"),)
    before = requests_ended(server, rpc, "INVALID_ARGUMENT")

    def call() -> object:
        if rpc == "TranslateStream":
            return list(channel.unary_stream(method, **same)(data, metadata=metadata, timeout=10))
        return channel.unary_unary(method, **same)(data, metadata=metadata, timeout=10)

    code, details = status_of(call)

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"the request is not a valid translator.v1.{rpc}Request: {fault}"
    assert requests_ended(server, rpc, "INVALID_ARGUMENT") == before + 1
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == metadata[0][1]]
    assert [r.getMessage() for r in lines] == [f"{rpc} INVALID_ARGUMENT"]
    assert not [r for r in caplog.records if r.exc_info]  # no traceback


# --- the process: python -m service, SIGTERM ---------------------------------------------------------


def test_sigterm_drains_in_flight_calls_and_exits_zero() -> None:
    env = {**os.environ, "TRANSLATOR_LOG_FORMAT": "text"}
    args = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--grace-period-s", "20"]
    process = subprocess.Popen(
        [sys.executable, "-m", "service", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        port = metrics_port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "the server exited before listening"
            match = re.search(r" port=(\d+) metrics_port=(\d+)", line)
            port, metrics_port = (int(match.group(1)), int(match.group(2))) if match else (None, None)
        assert port is not None

        def decoding() -> bool:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            match = re.search(r"^translator_sequences_in_flight (\S+)$", text, re.MULTILINE)
            return match is not None and float(match.group(1)) > 0

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TranslatorStub(channel)
            long = pb.TranslateOptions(
                stopping=pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=100)
            )
            # 48 texts × 4 beams × 100+ steps, more rows than fit at once: still decoding (or queued)
            # well after the checks below (about 1.5 s on 2 cores)
            long.beam.beam_size = 4
            many = TEXTS * 16
            in_flight = stub.Translate.future(pb.TranslateRequest(texts=many, options=long), timeout=60)
            assert wait_until(decoding)  # accepted (every text submitted at once) and decoding
            process.send_signal(signal.SIGTERM)

            def draining() -> bool:
                try:
                    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                except grpc.RpcError as err:
                    return err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()  # type: ignore[attr-defined]
                return False

            assert wait_until(draining)  # it has taken the signal

            # every new call, decoding or not, is refused while the calls in flight finish
            attend = pb.AttendRequest(source=TEXTS[0], target="J'aime les chats.")
            for call in (
                lambda: translate(stub, TEXTS[:1]),
                lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10),
                lambda: stub.Attend(attend, timeout=10),
            ):
                code, message = status_of(call)
                assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in message
            response = in_flight.result(timeout=60)
            assert all(t.output_tokens >= 100 for t in response.translations)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_cancelled_stream_leaves_the_batch(server: ServerThread, stub: pb_grpc.TranslatorStub) -> None:
    stopping = pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=120)
    request = pb.TranslateStreamRequest(text=TEXTS[1], options=pb.TranslateOptions(stopping=stopping))
    registry = server.running.metrics.registry
    cancelled = {"reason": "cancelled"}
    cancelled_before = registry.get_sample_value("translator_sequences_finished_total", cancelled) or 0.0
    before = server.running.scheduler.stats().outcomes
    with paced_steps(server.running.engine):  # 120 steps: still decoding when the cancel arrives
        stream = stub.TranslateStream(request, timeout=30)
        next(stream)  # decoding has started
        stream.cancel()
        assert wait_until(lambda: server.running.scheduler.stats().outcomes != before)
    stats = server.running.scheduler.stats()
    assert stats.outcomes == before + 1 and stats.in_flight == 0
    assert registry.get_sample_value("translator_sequences_finished_total", cancelled) == cancelled_before + 1


def test_a_cancelled_stream_takes_every_sentence_out_of_the_batch(
    server: ServerThread, stub: pb_grpc.TranslatorStub
) -> None:
    stopping = pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=120)
    text = f"{TEXTS[1]} {TEXTS[2]}"  # two sentences, decoding side by side
    request = pb.TranslateStreamRequest(text=text, options=pb.TranslateOptions(stopping=stopping))
    before = server.running.scheduler.stats().outcomes
    with paced_steps(server.running.engine):
        stream = stub.TranslateStream(request, timeout=30)
        next(stream)  # the first sentence is streaming; the second decodes meanwhile
        stream.cancel()
        assert wait_until(lambda: server.running.scheduler.stats().outcomes == before + 2)
    assert server.running.scheduler.stats().in_flight == 0


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_request_log_line_carries_the_fields(log_format: str) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(ServerConfig(log_format=log_format))  # type: ignore[arg-type]
        (handler,) = root.handlers
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    fields = {"request_id": "abc", "rpc": "Translate", "status": "OK", "input_tokens": 7}
    record = logging.LogRecord("service.rpc.servicer", logging.INFO, __file__, 1, "Translate OK", None, None)
    record.fields = fields
    line = handler.format(record)
    if log_format == "json":
        assert json.loads(line) | fields == json.loads(line) and json.loads(line)["message"] == "Translate OK"
        record.created = 1796285852.793  # RFC 3339, UTC, milliseconds: what log pipelines parse
        assert json.loads(handler.format(record))["time"] == "2026-12-03T08:17:32.793Z"
    else:
        assert line.endswith("Translate OK request_id=abc rpc=Translate status=OK input_tokens=7")


def test_the_metrics_port_binds_its_own_address() -> None:
    """--metrics-host: /metrics on 127.0.0.2 while gRPC would be on 127.0.0.1 (both loopback)."""
    server = ServerConfig(host="127.0.0.1", metrics_host="127.0.0.2", metrics_port=0)
    endpoint = listen_for_metrics(CollectorRegistry(), server)
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{endpoint.port}/metrics", timeout=10) as reply:
            assert reply.status == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", endpoint.port), timeout=10).close()
    finally:
        endpoint.close()


def test_one_model_directory_served_under_two_names() -> None:
    """`--model-dirs v2=DIR,v1=DIR`: two versions of a model side by side, each asked for by name."""
    base = loopback_config()
    named = (NamedModelDir("en-fr-v2", MODEL_DIR), NamedModelDir("en-fr-v1", MODEL_DIR))
    config = replace(base, engine=replace(base.engine, model_dirs=named, intra_op_threads=1))
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert sorted(m.name for m in info.models) == ["en-fr-v1", "en-fr-v2"]
        assert info.default_model == "en-fr-v2"
        texts = {}
        for name in ("en-fr-v1", "en-fr-v2", ""):
            request = pb.TranslateRequest(texts=[TEXTS[0]], options=pb.TranslateOptions(model=name))
            response = stub.Translate(request, timeout=30)
            texts[response.model] = response.translations[0].text
        assert set(texts) == {"en-fr-v1", "en-fr-v2"} and len(set(texts.values())) == 1
        request = pb.TranslateRequest(texts=[TEXTS[0]], options=pb.TranslateOptions(model="en-fr-small"))
        code, message = status_of(lambda: stub.Translate(request, timeout=30))
        assert code == grpc.StatusCode.NOT_FOUND and "this server has en-fr-v2, en-fr-v1" in message
