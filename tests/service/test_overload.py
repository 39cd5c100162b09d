"""The server's queue under load: only live requests hold places, and what cannot wait is refused at once.

A real server on loopback over the real engine. The engine is held still while the test looks: with
a StepHold the decode thread waits inside a decoder step (so it sweeps nothing: whatever leaves the
queue leaves it by itself), with paced_steps each step first waits 0.1 s (so a decode of n steps
takes at least n × 0.1 s, however fast the machine). No assertion is about speed.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.config import EngineConfig
from service.engine.engine import Engine
from tests.service.scheduler.test_scheduler import StepHold
from tests.service.server_fixture import ServerThread, loopback_config, paced_steps, wait_until

TEXTS = ["I love cats.", "The old man gives the red book to the child.", "We see a small dog."]
LONG = pb.TranslateOptions(stopping=pb.StoppingCriteria(max_output_tokens=128, min_output_tokens=127))
TWENTY = pb.TranslateOptions(stopping=pb.StoppingCriteria(max_output_tokens=21, min_output_tokens=20))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def _call(texts: list[str], options: pb.TranslateOptions | None = None) -> pb.TranslateRequest:
    return pb.TranslateRequest(texts=texts, options=options)


def _refusal(future: grpc.Future) -> tuple[grpc.StatusCode, str]:
    error = future.exception(timeout=60)
    assert isinstance(error, grpc.RpcError), error
    return error.code(), error.details()  # type: ignore[attr-defined]


class Counts:
    """A running server's counters, as moved since the snapshot."""

    def __init__(self, server: ServerThread) -> None:
        self._value = server.running.metrics.registry.get_sample_value
        self._before = {key: self._read(key) for key in self.KEYS}

    KEYS = (
        ("translator_requests_total", (("rpc", "Translate"), ("code", "OK"))),
        ("translator_requests_total", (("rpc", "Translate"), ("code", "CANCELLED"))),
        ("translator_requests_total", (("rpc", "Translate"), ("code", "RESOURCE_EXHAUSTED"))),
        ("translator_requests_rejected_total", (("reason", "queue_full"),)),
        ("translator_requests_rejected_total", (("reason", "expected_wait"),)),
        ("translator_sequences_finished_total", (("reason", "cancelled"),)),
    )

    def _read(self, key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return self._value(key[0], dict(key[1])) or 0.0

    def moved(self) -> dict[str, float]:
        """`name{label values}` → how much it moved (those that moved)."""
        moved = {key: self._read(key) - before for key, before in self._before.items()}
        return {f"{name}{{{','.join(v for _, v in labels)}}}": n for (name, labels), n in moved.items() if n}


@pytest.fixture
def held(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[StepHold]:
    hold = StepHold()
    monkeypatch.setattr(engine, "step", hold.wrap(engine.step))
    try:
        yield hold
    finally:
        hold.release()


def test_cancelled_waiting_calls_give_their_places_and_the_gauge_back_at_once(
    engine: Engine, held: StepHold
) -> None:
    """One row, decoding a long call whose decoder step is held; four calls fill the queue, a fifth
    is refused. The four are cancelled: while the decode thread is still held (it sweeps nothing),
    the queue-depth gauge reads 0 and four new calls are admitted; once released, every call ends
    as its client saw it, and the counters say the same."""
    config = loopback_config(instances=1, max_sequences=1, max_queue_size=4)
    with ServerThread(config, engine) as server, grpc.insecure_channel(server.target) as channel:
        translate = pb_grpc.TranslatorStub(channel).Translate
        scheduler, registry = server.running.scheduler, server.running.metrics.registry

        def depth() -> float | None:
            return registry.get_sample_value("translator_queue_depth")

        counts = Counts(server)
        held.after(1)  # the long call's first step runs, its second waits
        long = translate.future(_call(TEXTS[:1], LONG), timeout=60)
        assert held.wait_held()
        waiting = [translate.future(_call([text]), timeout=60) for text in TEXTS + TEXTS[:1]]
        assert wait_until(lambda: scheduler.stats().queued == 4) and depth() == 4
        code, details = _refusal(translate.future(_call(TEXTS[:1]), timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full (4 waiting" in details

        for call in waiting:
            assert call.cancel()
        assert wait_until(lambda: depth() == 0) and scheduler.stats().queued == 0
        admitted = [translate.future(_call([text]), timeout=60) for text in TEXTS + TEXTS[:1]]
        assert wait_until(lambda: depth() == 4) and scheduler.stats().queued == 4
        assert held.wait_held(timeout=0), "the decode thread left its held step"
        assert not long.done() and not any(call.done() for call in admitted)

        held.release()
        assert long.result(timeout=60).translations[0].output_tokens >= 127
        assert all(call.result(timeout=60).translations[0].text for call in admitted)
        assert wait_until(lambda: scheduler.stats().outcomes == 9)  # 1 + 4 cancelled + 4
        assert wait_until(
            lambda: (
                counts.moved()
                == {
                    "translator_requests_total{Translate,OK}": 5,
                    "translator_requests_total{Translate,CANCELLED}": 4,
                    "translator_requests_total{Translate,RESOURCE_EXHAUSTED}": 1,
                    "translator_requests_rejected_total{queue_full}": 1,
                    "translator_sequences_finished_total{cancelled}": 4,
                }
            )
        ), counts.moved()
        assert depth() == 0


def test_calls_whose_deadline_the_queue_cannot_meet_are_refused_at_once(engine: Engine) -> None:
    """One row. A call of at least 20 output tokens, each step paced (≥ 0.1 s), makes the measured
    decode time at least 2 s. Then a long call holds the row and a patient call (60 s) waits
    behind it: calls whose 1.5 s deadline leaves less than the expected wait (≥ 2 decode times)
    are refused RESOURCE_EXHAUSTED, saying why, while the long call still decodes — they never
    reach their deadline — and leave nothing in the queue; the patient call is served."""
    config = loopback_config(instances=1, max_sequences=1, max_queue_wait_s=60.0)
    with ServerThread(config, engine) as server, grpc.insecure_channel(server.target) as channel:
        translate = pb_grpc.TranslatorStub(channel).Translate
        scheduler = server.running.scheduler
        with paced_steps(engine):
            assert translate(_call(TEXTS[:1], TWENTY), timeout=60).translations[0].output_tokens >= 20
            counts = Counts(server)
            long = translate.future(_call(TEXTS[:1], LONG), timeout=60)
            assert wait_until(lambda: scheduler.stats().in_flight == 1)
            patient = translate.future(_call(TEXTS[:1]), timeout=60)
            assert wait_until(lambda: scheduler.stats().queued == 1)
            for texts in (TEXTS[:1], TEXTS):
                code, details = _refusal(translate.future(_call(texts), timeout=1.5))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
                assert "would wait about" in details and "its deadline leaves 1." in details, details
            assert scheduler.stats().queued == 1 and not long.done() and not patient.done()
            assert long.cancel()
        assert patient.result(timeout=60).translations[0].text
        assert wait_until(
            lambda: (
                counts.moved()
                == {
                    "translator_requests_total{Translate,OK}": 1,
                    "translator_requests_total{Translate,CANCELLED}": 1,
                    "translator_requests_total{Translate,RESOURCE_EXHAUSTED}": 2,
                    "translator_requests_rejected_total{expected_wait}": 2,
                    "translator_sequences_finished_total{cancelled}": 1,
                }
            )
        ), counts.moved()
        assert scheduler.stats().queued == 0
