"""Bearer tokens (service/rpc/auth.py): every RPC of translator.v1 refused UNAUTHENTICATED without a
known token, health and reflection served without one, and no token ever in a log or a metric."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.config import ConfigError, EngineConfig, SecurityConfig
from service.engine.engine import Engine
from service.rpc.auth import MISSING, WRONG, TokenAuth, load_tokens
from tests.service.server_fixture import ServerThread, loopback_config

GOOD = "good-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"
WRONG_TOKEN = "good-token-0123456789abcdeX"  # all but its last character right
SERVICE = "translator.v1.Translator"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def guarded(engine: Engine, **security: object) -> ServerThread:
    config = replace(loopback_config(), security=SecurityConfig(auth_tokens=(GOOD, OTHER), **security))  # type: ignore[arg-type]
    return ServerThread(config, engine)


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    with guarded(engine) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


CALLS: dict[str, Callable[[pb_grpc.TranslatorStub, object], object]] = {
    "Translate": lambda s, m: s.Translate(
        pb.TranslateRequest(texts=["I love cats."]), timeout=30, metadata=m
    ),
    "TranslateStream": lambda s, m: list(
        s.TranslateStream(pb.TranslateStreamRequest(text="I love cats."), timeout=30, metadata=m)
    ),
    "Attend": lambda s, m: s.Attend(pb.AttendRequest(source="I love cats."), timeout=30, metadata=m),
    "GetModelInfo": lambda s, m: s.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=m),
}


def status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("rpc", CALLS)
def test_every_rpc_needs_a_known_token(channel: grpc.Channel, rpc: str) -> None:
    stub, call = pb_grpc.TranslatorStub(channel), CALLS[rpc]
    assert status(lambda: call(stub, ())) == (grpc.StatusCode.UNAUTHENTICATED, MISSING)
    assert status(lambda: call(stub, bearer(WRONG_TOKEN))) == (grpc.StatusCode.UNAUTHENTICATED, WRONG)
    assert status(lambda: call(stub, (("authorization", GOOD),))) == (
        grpc.StatusCode.UNAUTHENTICATED,
        MISSING,
    )
    assert status(lambda: call(stub, bearer(GOOD))) == (grpc.StatusCode.OK, "")
    assert status(lambda: call(stub, (("authorization", f"bearer  {OTHER} "),))) == (grpc.StatusCode.OK, "")


def test_health_and_reflection_need_no_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_the_exempt_services_are_configurable(engine: Engine) -> None:
    with guarded(engine, auth_exempt_services=()) as server, grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        code, _ = status(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=bearer(GOOD)).status


def test_no_token_reaches_the_logs_or_the_metrics(
    server: ServerThread, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = pb_grpc.TranslatorStub(channel)
    with caplog.at_level(logging.DEBUG):
        for token in (GOOD, WRONG_TOKEN):
            for call in CALLS.values():
                status(lambda call=call, token=token: call(stub, bearer(token)))  # type: ignore[misc]
    assert "UNAUTHENTICATED" in caplog.text and "translator.v1.Translator/Translate" in caplog.text
    port = server.running.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    for token in (GOOD, WRONG_TOKEN, OTHER):
        for part in (token, token[:12], token[-12:]):
            assert part not in caplog.text and part not in metrics
    assert GOOD not in repr(server.running.config)  # nor in the config's text (repr=False)


def test_the_check_compares_whole_tokens() -> None:
    auth = TokenAuth([GOOD], ())
    assert auth.check(bearer(GOOD)) is None
    assert auth.check(bearer(GOOD[:-1])) == WRONG and auth.check(bearer(GOOD + "x")) == WRONG
    assert auth.check(()) == MISSING and auth.check(bearer(GOOD) * 2) == MISSING  # one header, not two
    assert auth.check((("authorization", f"Basic {GOOD}"),)) == MISSING


def test_tokens_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# the balancer\n{GOOD}\n\n  {OTHER}  \n", encoding="utf-8")
    assert load_tokens(SecurityConfig(auth_tokens_file=path)) == (GOOD, OTHER)
    assert load_tokens(SecurityConfig(auth_tokens=("env-token-0123456789",), auth_tokens_file=path))[0] == (
        "env-token-0123456789"
    )
    assert load_tokens(SecurityConfig()) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# only a comment\n\n", "no token in it"),
        (f"{GOOD}\nshort-secret\n", "line 2: token 1: expected at least 16 characters"),
        (f"{GOOD}\npass word with spaces\n", "line 2: token 1: expected printable ASCII"),
    ],
)
def test_a_bad_tokens_file_is_a_config_error_that_never_shows_a_token(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        load_tokens(SecurityConfig(auth_tokens_file=path))
    assert "short-secret" not in str(info.value) and "pass word" not in str(info.value)
