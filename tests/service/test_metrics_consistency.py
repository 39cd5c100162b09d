"""The metrics against what really happened: the real server and the committed model, a known mix of
calls in both scheduler modes (and under two worker processes), every series checked against the
client's own record of the calls once the server is idle (docs/metrics.md says what each counts).

A `Client` makes the calls and keeps a `Ledger`: each call's status, and for every text what became
of it (a translation, with its tokens and timings as the response reports them; or cancelled or
expired, in the queue or after joining the batch). `check` works out from the ledger exactly what
each series must have moved by, and compares with two scrapes of /metrics taken around the calls.

Three tests hold up one step of the real server (publishing a gauge, a decoder step) to force an
interleaving of its threads that load brings about at random.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.metrics import FINISH_REASONS, REJECT_REASONS, RPCS
from service.modeldir.tokenizer import Tokenizer
from service.server import SERVICE
from tests.service.server_fixture import ServerThread, held_step, loopback_config, paced_steps, wait_until

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["I love cats.", "The old man gives the red book to the child.", "We see a small dog."]
MODES = ["continuous", "collect"]
KV_BUDGET = 65536  # the default --max-kv-cache-tokens; 2 instances or 2 workers split it evenly
# The longest decode the model allows (128 positions), kept going to the limit: beam 8 over 8 texts
# is 64 rows × 128 steps, about a second on 2 cores (half that over 2 instances): SHORT_DEADLINE_S
# passes long before it ends, and long after every text has joined the batch (tens of ms, about
# 0.1 s on a busy machine): the one window left, for a server in another process. A server in this
# one has its decoder steps paced (server_fixture.paced_steps: such a decode takes 12.8 s at least),
# and a call that must expire in its queue or batch gets PACED_DEADLINE_S to get there.
LONG = pb.TranslateOptions(
    beam=pb.BeamSearch(beam_size=8),
    stopping=pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=127),
)
SHORT_DEADLINE_S = 0.3
PACED_DEADLINE_S = 1.0
OK = grpc.StatusCode.OK
T = TypeVar("T")
TOKENIZER = Tokenizer.from_file(ROOT / "models/en-fr-small/tokenizer.json")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics_port: int) -> Samples:
    """Every `translator_` sample of /metrics (not the `_bucket`s and `_created`s)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("translator_") and not s.name.endswith(("_bucket", "_created"))
    }


def timed(options: pb.TranslateOptions | None) -> pb.TranslateOptions:
    """A copy of `options` that asks for the timings."""
    copy = pb.TranslateOptions(return_timings=True)
    if options is not None:
        copy.MergeFrom(options)
    return copy


def source_tokens(text: str) -> int:
    return len(TOKENIZER.encode_source(text, 128))


# --- what the client saw ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One text that ended with a translation, as the response reports it."""

    input_tokens: int
    output_tokens: int  # end token included (Translation.output_tokens)
    end_of_sequence: bool
    timings: pb.Timings | None  # None: the RPC reports none (Attend)
    greedy: bool  # one row per decoder step, one step per output token


@dataclass
class Ledger:
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rpc, status code name)
    results: list[Result] = field(default_factory=list)
    gone: Counter[str] = field(default_factory=Counter)  # texts that ended without a result, by reason
    # source tokens of each text in `gone` that had joined the running batch (its queue wait ended)
    admitted_gone: list[int] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    attention_runs: int = 0


class Client:
    """Calls translator.v1.Translator and records what happened in `ledger`. `paced`: the server's
    decoder steps paced around a call that must expire while decoding (an in-process server)."""

    def __init__(
        self,
        connect: Callable[[], grpc.Channel],
        paced: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    ) -> None:
        self.connect, self.ledger, self.paced = connect, Ledger(), paced

    def _call(self, rpc: str, code: grpc.StatusCode, call: Callable[[pb_grpc.TranslatorStub], T]) -> T | None:
        with self.connect() as channel:
            try:
                reply: T | None = call(pb_grpc.TranslatorStub(channel))
                got = grpc.StatusCode.OK
            except grpc.RpcError as err:
                reply, got = None, err.code()
        assert got == code, f"{rpc}: {got}, expected {code}"
        self.ledger.calls[rpc, got.name] += 1
        return reply

    def translate(
        self,
        texts: list[str],
        options: pb.TranslateOptions | None = None,
        *,
        code: grpc.StatusCode = OK,
        timeout: float = 60.0,
    ) -> None:
        options = timed(options)
        request = pb.TranslateRequest(texts=texts, options=options)
        reply = self._call("Translate", code, lambda stub: stub.Translate(request, timeout=timeout))
        if reply is not None:
            self.record(reply, options)

    def stream(
        self, text: str, options: pb.TranslateOptions | None = None, *, code: grpc.StatusCode = OK
    ) -> None:
        options = timed(options)
        request = pb.TranslateStreamRequest(text=text, options=options)
        messages = self._call(
            "TranslateStream", code, lambda stub: list(stub.TranslateStream(request, timeout=60))
        )
        if messages is not None:
            self.record(messages[-1].final, options)

    def cancelled_stream(self, text: str) -> None:
        """A stream that the client cancels after its first tokens: its row leaves the batch."""
        request = pb.TranslateStreamRequest(text=text, options=pb.TranslateOptions(stopping=LONG.stopping))

        def cancel_midway(stub: pb_grpc.TranslatorStub) -> None:
            stream = stub.TranslateStream(request, timeout=60)
            next(stream), next(stream)  # two tokens chosen: it is decoding
            stream.cancel()
            next(stream)  # raises CANCELLED

        self._call("TranslateStream", grpc.StatusCode.CANCELLED, cancel_midway)
        self.ledger.gone["cancelled"] += 1
        self.ledger.admitted_gone.append(source_tokens(text))

    def expired(self, texts: list[str]) -> None:
        """A call that cannot finish before its deadline: every text joins the batch, then expires."""
        expiring = grpc.StatusCode.DEADLINE_EXCEEDED
        if self.paced is None:
            self.translate(texts, LONG, code=expiring, timeout=SHORT_DEADLINE_S)
        else:
            with self.paced():
                self.translate(texts, LONG, code=expiring, timeout=PACED_DEADLINE_S)
        self.ledger.gone["deadline"] += len(texts)
        self.ledger.admitted_gone.extend(source_tokens(t) for t in texts)

    def attend(
        self, source: str, target: str | None = None, *, code: grpc.StatusCode = OK, **fields: object
    ) -> None:
        request = pb.AttendRequest(source=source, target=target, **fields)  # type: ignore[arg-type]
        reply = self._call("Attend", code, lambda stub: stub.Attend(request, timeout=60))
        if reply is None:
            return
        self.ledger.attention_runs += 1
        if target is None:  # decoded greedily first (to its end token, for these short sentences)
            n = len(reply.target_tokens)
            self.ledger.results.append(Result(len(reply.source_tokens), n, True, None, greedy=True))

    def model_info(self) -> None:
        self._call("GetModelInfo", OK, lambda stub: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60))

    def record(self, response: pb.TranslateResponse, options: pb.TranslateOptions) -> None:
        """The translations of a response that the call decoded with `options`."""
        greedy = options.WhichOneof("strategy") != "beam"
        for t in response.translations:
            eos = t.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE
            self.ledger.results.append(Result(t.input_tokens, t.output_tokens, eos, t.timings, greedy))


# --- the checks ---------------------------------------------------------------------------------------

IDLE = {
    "translator_sequences_in_flight": 0.0,
    "translator_queue_depth": 0.0,
    "translator_kv_cache_used_tokens": 0.0,
    "translator_kv_cache_capacity_tokens": float(KV_BUDGET),
}


def check(ledger: Ledger, before: Samples, after: Samples) -> None:
    """Every series against the ledger of the calls made between the two scrapes."""

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # every RPC under its status code, each once, and its duration observed once
    ended = {
        (labels["rpc"], labels["code"]): moved(name, **labels)
        for name, labels in ((n, dict(ls)) for n, ls in after)
        if name == "translator_requests_total"
    }
    assert {k: v for k, v in ended.items() if v} == dict(ledger.calls)
    for rpc in RPCS:
        calls = sum(n for (r, _), n in ledger.calls.items() if r == rpc)
        assert moved("translator_request_duration_seconds_count", rpc=rpc) == calls, rpc
    rejected = {
        reason: moved("translator_requests_rejected_total", reason=reason) for reason in REJECT_REASONS
    }
    assert rejected == {reason: ledger.rejected[reason] for reason in REJECT_REASONS}

    # every text once, by how it ended
    results = ledger.results
    finished = {
        reason: moved("translator_sequences_finished_total", reason=reason) for reason in FINISH_REASONS
    }
    assert finished == {
        "end_of_sequence": sum(r.end_of_sequence for r in results),
        "length": sum(not r.end_of_sequence for r in results),
        "cancelled": ledger.gone["cancelled"],
        "deadline": ledger.gone["deadline"],
        "error": 0,
    }

    # a queue wait and its source tokens per text that joined the batch; a first token and a time per
    # output token per translation; output tokens as the responses count them (the end token included)
    admitted = len(results) + len(ledger.admitted_gone)
    assert moved("translator_queue_wait_seconds_count") == admitted
    inputs = sum(r.input_tokens for r in results) + sum(ledger.admitted_gone)
    assert moved("translator_input_tokens_total") == inputs
    assert moved("translator_output_tokens_total") == sum(r.output_tokens for r in results)
    assert moved("translator_time_to_first_token_seconds_count") == len(results)
    assert all(r.output_tokens > 1 for r in results if not r.greedy)  # else its step count is unknown
    per_token = sum(r.output_tokens > 1 for r in results)
    assert moved("translator_time_per_output_token_seconds_count") == per_token

    # the timings a response reports are the very values observed
    timed = [r for r in results if r.timings is not None]
    ttft = sum(r.timings.time_to_first_token_seconds for r in timed if r.timings is not None)
    if len(timed) == len(results):
        assert moved("translator_time_to_first_token_seconds_sum") == pytest.approx(ttft, rel=1e-9)
        if not ledger.admitted_gone:
            queued = sum(r.timings.queue_seconds for r in timed if r.timings is not None)
            assert moved("translator_queue_wait_seconds_sum") == pytest.approx(queued, rel=1e-9, abs=1e-12)
        if all(r.greedy for r in results):  # one decoder step per output token, end token included
            gaps = sum(_time_per_output_token(r) for r in results if r.output_tokens > 1)
            assert moved("translator_time_per_output_token_seconds_sum") == pytest.approx(gaps, rel=1e-9)
    else:
        assert moved("translator_time_to_first_token_seconds_sum") > ttft

    # each decoder step: one batch-size and one duration observation, one decoder graph run
    steps = moved("translator_decode_step_batch_size_count")
    assert steps == moved("translator_decode_step_duration_seconds_count")
    assert steps == moved("translator_onnxruntime_run_duration_seconds_count", graph="decoder_step")
    rows = moved("translator_decode_step_batch_size_sum")  # row-steps; a greedy text: one per output token
    decoded = sum(r.output_tokens for r in results)
    if all(r.greedy for r in results) and not ledger.admitted_gone:
        assert rows == decoded
    else:
        assert rows > decoded and steps >= max((r.output_tokens for r in results), default=0)
    # every text that joined the batch was encoded once, with others or alone
    encoder_runs = moved("translator_onnxruntime_run_duration_seconds_count", graph="encoder")
    assert min(admitted, 1) <= encoder_runs <= admitted
    assert (
        moved("translator_onnxruntime_run_duration_seconds_count", graph="attention") == ledger.attention_runs
    )

    # idle again: nothing in flight, nothing queued, no cache held, the whole budget on offer
    assert {name: after[name, frozenset()] for name in IDLE} == IDLE


def _time_per_output_token(r: Result) -> float:
    """What a greedy translation's response says its time per output token was: from its first
    token to its last (the end token when produced), over the gaps between them."""
    t = r.timings
    assert t is not None
    return (t.queue_seconds + t.decode_seconds - t.time_to_first_token_seconds) / (r.output_tokens - 1)


DECODER_RUNS = ("translator_onnxruntime_run_duration_seconds_count", frozenset({("graph", "decoder_step")}))


def settled(metrics_port: int, before: Samples, ledger: Ledger, timeout: float = 15.0) -> Samples:
    """/metrics once every call of the ledger has been counted, every text has left the scheduler
    (a call that the client cancelled or saw expire ends a little later on the server) and every
    decoder graph run is matched by its observed step. The last: a clean-clone CI run once scraped
    the two-worker server with 77 decoder runs against 76 steps, every text already counted; a
    step still being observed settles, a run without a step would still fail the check."""
    calls = sum(ledger.calls.values())
    texts = len(ledger.results) + sum(ledger.gone.values())
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(metrics_port)
        counted = _total(now, "translator_requests_total") - _total(before, "translator_requests_total")
        left = _total(now, "translator_sequences_finished_total") - _total(
            before, "translator_sequences_finished_total"
        )
        idle = now["translator_sequences_in_flight", frozenset()] == 0
        steps = _total(now, "translator_decode_step_duration_seconds_count") - _total(
            before, "translator_decode_step_duration_seconds_count"
        )
        whole = steps == now.get(DECODER_RUNS, 0.0) - before.get(DECODER_RUNS, 0.0)
        if (counted >= calls and left >= texts and idle and whole) or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


# --- the calls ----------------------------------------------------------------------------------------


def greedy_calls(client: Client) -> None:
    """One row per text, every result timed: the sums must equal what the responses report."""
    client.translate(TEXTS)
    client.translate(TEXTS[:2], pb.TranslateOptions(sampling=pb.Sampling(temperature=0.8, seed=7)))
    client.translate(TEXTS[1:2], pb.TranslateOptions(target_prefix="Le"))
    client.stream(TEXTS[2])


def mixed_calls(client: Client) -> None:
    """Every RPC, ended every way a client can make one end."""
    client.translate(TEXTS[1:2], pb.TranslateOptions(beam=pb.BeamSearch(beam_size=4), n_best=3))
    client.stream(TEXTS[0])
    client.attend(TEXTS[0], "J'aime les chats.")
    client.attend(TEXTS[2])  # its target decoded first
    client.model_info()
    invalid, unknown = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    client.translate([], code=invalid)
    client.translate(TEXTS[:1], pb.TranslateOptions(sampling=pb.Sampling(temperature=20.0)), code=invalid)
    client.stream(TEXTS[0], pb.TranslateOptions(beam=pb.BeamSearch(beam_size=2)), code=invalid)
    client.attend(TEXTS[0], code=invalid, heads=[9])
    client.translate(TEXTS[:1], pb.TranslateOptions(model="de-en"), code=unknown)
    client.stream(TEXTS[0], pb.TranslateOptions(model="de-en"), code=unknown)
    client.attend(TEXTS[0], code=unknown, model="de-en")
    client.expired((TEXTS * 3)[:8])
    client.cancelled_stream(TEXTS[1])


def calls_then_check(metrics_port: int, client: Client, calls: Callable[[Client], None]) -> None:
    client.ledger = Ledger()
    before = scrape(metrics_port)
    calls(client)
    check(client.ledger, before, settled(metrics_port, before, client.ledger))


def check_warm_up(samples: Samples, processes: int) -> None:
    """Before any call: the warm-up's graph runs, per process (docs/metrics.md), and no scheduler step."""
    runs = {
        graph: samples["translator_onnxruntime_run_duration_seconds_count", frozenset({("graph", graph)})]
        for graph in ("encoder", "decoder_step", "attention")
    }
    assert runs == {"encoder": processes, "decoder_step": 3 * processes, "attention": processes}
    assert samples["translator_decode_step_batch_size_count", frozenset()] == 0


# --- in one process -----------------------------------------------------------------------------------


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    # The server loads the engine itself, so that its graph runs are observed in its metrics. Two
    # instances, each with room for the expiring call's 4 × 8 beams at once.
    config = loopback_config(mode=request.param, instances=2, max_sequences=128)
    with ServerThread(config) as running:
        yield running


def test_every_series_agrees_with_the_calls_made(server: ServerThread) -> None:
    """Greedy calls first (every sum exact), then every RPC ended every way, on 2 instances."""
    client = Client(lambda: grpc.insecure_channel(server.target), lambda: paced_steps(server.running.engine))
    port = server.running.metrics_port
    assert port is not None
    check_warm_up(scrape(port), processes=1)
    calls_then_check(port, client, greedy_calls)
    calls_then_check(port, client, mixed_calls)


@pytest.mark.parametrize("mode", MODES)
def test_calls_refused_expired_and_cancelled_in_the_queue(mode: str) -> None:
    """One instance full with a long call, and calls waiting behind it: one refused (the queue is
    full; the texts it had queued leave), one that its client cancels and one that expires. Each
    leaves the queue at once, while the long call decodes, in either mode. The long call's steps are
    paced until the checks are done: it is still decoding however slowly this runs, and the queue is
    swept between its steps."""
    config = loopback_config(mode=mode, instances=1, max_queue_size=8)
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        stub, port = pb_grpc.TranslatorStub(channel), server.running.metrics_port
        assert port is not None
        client = Client(lambda: grpc.insecure_channel(server.target))
        ledger = client.ledger

        def queue_depth_becomes(n: int) -> bool:
            return wait_until(lambda: scrape(port)["translator_queue_depth", frozenset()] == n)

        before = scrape(port)
        long = timed(LONG)
        with paced_steps(server.running.engine):
            request = pb.TranslateRequest(texts=(TEXTS * 3)[:8], options=long)
            decoding = stub.Translate.future(request, timeout=60)  # 8 × 8 beams: all the rows
            assert wait_until(lambda: server.running.scheduler.stats().in_flight == 8)
            one = pb.TranslateRequest(texts=TEXTS[:1])
            abandoned = stub.Translate.future(one, timeout=60)
            assert queue_depth_becomes(1)

            client.translate((TEXTS * 3)[:8], code=grpc.StatusCode.RESOURCE_EXHAUSTED)  # 7 queued, 1 refused
            ledger.rejected["queue_full"] += 1
            ledger.gone["cancelled"] += 7  # they leave the queue rather than wait to decode for nobody
            assert queue_depth_becomes(1)
            assert abandoned.cancel()
            ledger.calls["Translate", "CANCELLED"] += 1
            ledger.gone["cancelled"] += 1
            assert queue_depth_becomes(0)
            expiring = stub.Translate.future(one, timeout=PACED_DEADLINE_S)
            assert queue_depth_becomes(1)
            assert expiring.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
            ledger.calls["Translate", "DEADLINE_EXCEEDED"] += 1
            ledger.gone["deadline"] += 1
            assert queue_depth_becomes(0)
            assert not decoding.done()  # all of it while the long call decoded
        client.record(decoding.result(), long)
        ledger.calls["Translate", "OK"] += 1

        check(ledger, before, settled(port, before, ledger))


@pytest.mark.parametrize("mode", MODES)
def test_the_queue_depth_published_by_submit_cannot_outlive_the_wait(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between queueing a request and publishing the queue depth, submit can lose the processor to
    the decode thread, which takes the request and publishes the emptier queue. Forced here: the
    submitter is held up right before it publishes. The depth must still end at 0."""
    with ServerThread(loopback_config(mode=mode, instances=1)) as server:
        metrics, port = server.running.metrics, server.running.metrics_port
        assert port is not None
        publish = metrics.set_queue_depth

        def late(n: int, *, instance: int = 0) -> None:
            if not threading.current_thread().name.startswith("scheduler-"):
                time.sleep(0.1)  # the decode thread takes the request meanwhile, if it can
            publish(n, instance=instance)

        monkeypatch.setattr(metrics, "set_queue_depth", late)
        client = Client(lambda: grpc.insecure_channel(server.target))
        calls_then_check(port, client, lambda c: c.translate(TEXTS[:1]))


# --- two worker processes -----------------------------------------------------------------------------


def test_two_worker_processes_add_up_to_the_calls_made(tmp_path: Path) -> None:
    """`python -m service --workers 2`: the supervisor's /metrics adds the workers' series up; the
    same calls, each on a connection of its own (the kernel hands each to either worker)."""
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "service", "--workers", "2", "--instances", "1", "--max-sequences", "128"]
    argv += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--log-format", "json"]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        assert wait_until(lambda: "(2 workers" in log.read_text() or process.poll() is not None, 90)
        match = re.search(r"port=(\d+) metrics_port=(\d+) \(2 workers", log.read_text())
        assert match, log.read_text()
        port, metrics_port = int(match.group(1)), int(match.group(2))
        target = f"127.0.0.1:{port}"
        client = Client(
            lambda: grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        )
        check_warm_up(scrape(metrics_port), processes=2)
        calls_then_check(metrics_port, client, greedy_calls)
        calls_then_check(metrics_port, client, mixed_calls)
    finally:
        process.send_signal(signal.SIGTERM)  # its workers drain and stop with it
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- every call, however it ends ----------------------------------------------------------------------

MESSAGE_LIMIT = 16 * 1024  # --max-message-bytes of the server below: a longer request is refused


def test_every_call_is_counted_under_the_code_its_client_saw() -> None:
    """translator_requests_total, scraped from /metrics, equals the client's own count of its calls
    by RPC and code: calls answered, refused as invalid or unknown, refused by gRPC before any
    handler (a message over the limit, a request stream with no message), expired (round and
    non-round deadlines: gRPC rounds the latter up) or cancelled in the queue behind a held decoder
    step, and expired or cancelled while the server's event loop is held, so that gRPC ends them
    before they reach any handler."""
    config = loopback_config(instances=1)
    config = replace(config, server=replace(config.server, max_message_bytes=MESSAGE_LIMIT))
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        stub, port = pb_grpc.TranslatorStub(channel), server.running.metrics_port
        assert port is not None
        client = Client(lambda: grpc.insecure_channel(server.target))
        calls = client.ledger.calls
        before = scrape(port)

        def ended(rpc: str, call: grpc.Future, code: grpc.StatusCode) -> None:
            try:
                call.result(timeout=60)
                got = OK
            except grpc.FutureCancelledError:
                got = grpc.StatusCode.CANCELLED
            except grpc.RpcError as err:
                got = err.code()
            assert got == code, f"{rpc}: {got}, expected {code}"
            calls[rpc, got.name] += 1

        # answered, refused by the servicer, refused by gRPC
        client.translate(TEXTS[:2])
        client.stream(TEXTS[0])
        client.model_info()
        client.cancelled_stream(TEXTS[1])
        client.translate([], code=grpc.StatusCode.INVALID_ARGUMENT)
        client.translate(TEXTS[:1], pb.TranslateOptions(model="de-en"), code=grpc.StatusCode.NOT_FOUND)
        client.attend(TEXTS[0], code=grpc.StatusCode.NOT_FOUND, model="de-en")
        client.translate(["a" * MESSAGE_LIMIT], code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        no_message = channel.stream_unary(f"/{SERVICE}/Translate").future(iter(()), timeout=10)
        ended("Translate", no_message, grpc.StatusCode.INVALID_ARGUMENT)

        # behind a held decoder step: waiting in the queue until they expire or their client cancels
        scheduler, one = server.running.scheduler, pb.TranslateRequest(texts=TEXTS[:1])
        with held_step(server.running.engine) as held_up:
            decoding = stub.Translate.future(one, timeout=60)
            assert held_up.wait(30)
            cancelled = [stub.Translate.future(one, timeout=60) for _ in range(3)]
            assert wait_until(lambda: scheduler.stats().queued == 3)
            for call in cancelled:
                call.cancel()
                ended("Translate", call, grpc.StatusCode.CANCELLED)
            expiring = [stub.Translate.future(one, timeout=t) for t in (0.3, 0.3, 1.2345, 1.2345)]
            for call in expiring:
                ended("Translate", call, grpc.StatusCode.DEADLINE_EXCEEDED)
        ended("Translate", decoding, OK)

        # while the event loop is held: gRPC has them, no handler does. The cancelled ones are
        # cancelled once the calls started after them have expired at their client.
        with server.loop_held():
            cancelled = [stub.Translate.future(one, timeout=60) for _ in range(3)]
            expiring = [stub.GetModelInfo.future(pb.GetModelInfoRequest(), timeout=0.3) for _ in range(3)]
            for call in expiring:
                ended("GetModelInfo", call, grpc.StatusCode.DEADLINE_EXCEEDED)
            for call in cancelled:
                call.cancel()
                ended("Translate", call, grpc.StatusCode.CANCELLED)

        sent = sum(calls.values())

        def counted() -> dict[tuple[str, str], float]:
            now = scrape(port)
            return {
                (dict(labels)["rpc"], dict(labels)["code"]): value - before.get((name, labels), 0.0)
                for (name, labels), value in now.items()
                if name == "translator_requests_total" and value != before.get((name, labels), 0.0)
            }

        assert wait_until(lambda: sum(counted().values()) >= sent, 30)
        assert counted() == dict(calls)


@pytest.mark.parametrize("mode", MODES)
def test_a_caller_with_its_result_finds_its_request_gone_from_the_gauges(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode thread publishes the gauges after a request leaves; forced slow here, the caller
    that has its result must still not find its request in flight, nor its rows in the KV cache."""
    with ServerThread(loopback_config(mode=mode, instances=1)) as server:
        metrics, port = server.running.metrics, server.running.metrics_port
        assert port is not None
        publish = metrics.set_in_flight

        def late(n: int, *, instance: int = 0) -> None:
            if n == 0:
                time.sleep(0.1)  # the event loop answers the call meanwhile, if it has heard
            publish(n, instance=instance)

        monkeypatch.setattr(metrics, "set_in_flight", late)
        client = Client(lambda: grpc.insecure_channel(server.target))
        client.translate(TEXTS[:1])
        assert {name: value for name, value in scrape(port).items() if name[0] in IDLE} == {
            (name, frozenset()): value for name, value in IDLE.items()
        }


@pytest.mark.parametrize("mode", MODES)
def test_a_call_cancelled_before_its_deadline_is_cancelled_though_looked_at_after(mode: str) -> None:
    """A call that its client cancels before its deadline ends CANCELLED, and its text leaves as
    cancelled, even when the decode thread (held up in one decoder step here) only looks once the
    deadline has passed too."""
    with ServerThread(loopback_config(mode=mode, instances=1)) as server:
        engine, port = server.running.engine, server.running.metrics_port
        assert port is not None
        client = Client(lambda: grpc.insecure_channel(server.target))
        ledger = client.ledger
        before = scrape(port)
        with grpc.insecure_channel(server.target) as channel, held_step(engine) as held_up:
            request = pb.TranslateRequest(texts=TEXTS[:1], options=LONG)
            call = pb_grpc.TranslatorStub(channel).Translate.future(request, timeout=PACED_DEADLINE_S)
            assert held_up.wait(30)  # the decode thread is in the call's first step (it has joined)
            # The server's deadline: the call's arrival, before now, plus at most its timeout.
            past_deadline = time.monotonic() + PACED_DEADLINE_S + 0.05
            assert call.cancel()
            time.sleep(max(0.0, past_deadline - time.monotonic()))
        ledger.calls["Translate", "CANCELLED"] += 1
        ledger.gone["cancelled"] += 1
        ledger.admitted_gone.append(source_tokens(TEXTS[0]))
        check(ledger, before, settled(port, before, ledger))
