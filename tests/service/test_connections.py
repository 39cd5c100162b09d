"""The gRPC port under raw HTTP/2 (tests/service/h2_frames.py): the connection limits of
ServerConfig (service/server.py `connection_limits`) hold against half-open streams, too many streams,
ping floods and junk, while other clients are served.

Each server here shares one engine; the limits are set small so that every test waits on what the
server sends (frames, the connection's end), never on a clock.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.config import EngineConfig, ServerConfig
from service.engine.engine import Engine
from service.server import connection_limits
from tests.service import h2_frames as h2
from tests.service.server_fixture import ServerThread, loopback_config

STREAMS = 4  # the stream limit of the `limited` server
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def _server(engine: Engine, **limits: object) -> ServerThread:
    config = loopback_config()
    return ServerThread(replace(config, server=replace(config.server, **limits)), engine)


@pytest.fixture(scope="module")
def limited(engine: Engine) -> Iterator[ServerThread]:
    """The default limits, but STREAMS streams per connection."""
    with _server(engine, max_concurrent_streams=STREAMS) as running:
        yield running


@pytest.fixture(scope="module")
def short_lived(engine: Engine) -> Iterator[ServerThread]:
    """Connections closed after 0.5 s without calls, or 2 s after they opened (+0.5 s for calls)."""
    with _server(
        engine, max_connection_idle_s=0.5, max_connection_age_s=2.0, max_connection_age_grace_s=0.5
    ) as s:
        yield s


def served(server: ServerThread) -> bool:
    """A Translate call on a connection of its own succeeds."""
    with grpc.insecure_channel(server.target) as channel:
        request = pb.TranslateRequest(texts=["I love cats."])
        return pb_grpc.TranslatorStub(channel).Translate(request, timeout=60).translations[0].text != ""


def ended(frames: list[h2.Frame], stream: int) -> bool:
    """The server ended `stream`: trailers (HEADERS with END_STREAM) or RST_STREAM."""
    return any(
        f.stream == stream and (f.type == h2.RST_STREAM or (f.type == h2.HEADERS and f.flags & h2.END_STREAM))
        for f in frames
    )


def test_the_defaults_bound_streams_idle_and_age_and_keepalive() -> None:
    options = dict(connection_limits(ServerConfig()))
    assert options["grpc.max_concurrent_streams"] == 128
    assert options["grpc.max_allowed_incoming_connections"] == 1024
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert (options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]) == (
        1_800_000,
        30_000,
    )
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (60_000, 20_000)
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    # 0 turns a limit off: grpc core's own default (unlimited, never) rather than a zero limit
    off = ServerConfig(max_concurrent_streams=0, max_connection_age_s=0, keepalive_time_s=0)
    names = dict(connection_limits(off))
    assert not {"grpc.max_concurrent_streams", "grpc.max_connection_age_ms", "grpc.keepalive_time_ms"} & set(
        names
    )


def test_streams_beyond_the_limit_are_refused_and_others_are_served(limited: ServerThread) -> None:
    with h2.Connection(limited.running.port) as conn:
        assert conn.start().settings()[h2.SETTINGS_MAX_CONCURRENT_STREAMS] == STREAMS
        held = [1 + 2 * i for i in range(STREAMS)]  # half-open: headers, no message, never ended
        extra = [held[-1] + 2, held[-1] + 4]
        for stream in held + extra:
            conn.open_stream(stream, end_stream=False)
        refused = []
        while len(refused) < len(extra):
            f = conn.read_until(lambda f: f.type in (h2.RST_STREAM, h2.HEADERS, h2.GOAWAY))
            assert f is not None and f.type == h2.RST_STREAM, f
            assert f.error_code == h2.REFUSED_STREAM
            refused.append(f.stream)
        assert refused == extra  # and none of the held ones was ended before them
        assert served(limited)  # while this connection holds its streams


def test_half_open_streams_end_with_their_connection_at_its_age(short_lived: ServerThread) -> None:
    with h2.Connection(short_lived.running.port) as conn:
        conn.start()
        conn.open_stream(1, end_stream=True)  # HEADERS + END_STREAM: no request message at all
        conn.open_stream(3, end_stream=False)  # a message announcing 100 bytes, carrying 10, ended
        conn.send(h2.frame(h2.DATA, h2.END_STREAM, 3, h2.grpc_message(b"x" * 10, announced=100)))
        conn.open_stream(5, end_stream=False)  # the same, the stream left open
        conn.send(h2.frame(h2.DATA, 0, 5, h2.grpc_message(b"x" * 10, announced=100)))
        frames = conn.frames_until_closed()
    goaways = [f for f in frames if f.type == h2.GOAWAY]
    assert goaways and all(b"max_age" in f.payload for f in goaways), frames
    assert all(ended(frames, stream) for stream in (1, 3, 5)), frames
    assert served(short_lived)


def test_a_connection_without_calls_is_closed_when_idle(short_lived: ServerThread) -> None:
    with h2.Connection(short_lived.running.port) as conn:
        conn.start()
        frames = conn.frames_until_closed()
    (goaway,) = [f for f in frames if f.type == h2.GOAWAY]
    assert b"connection idle" in goaway.payload  # (grpc core sends it as INTERNAL_ERROR)


def test_a_ping_flood_closes_the_connection_with_enhance_your_calm(limited: ServerThread) -> None:
    with h2.Connection(limited.running.port) as conn:
        conn.start()
        for _ in range(4):  # no data, no call: only one ping per min_client_ping_interval_s
            conn.send(h2.frame(h2.PING, 0, 0, b"12345678"))
        frames = conn.frames_until_closed()
    (goaway,) = [f for f in frames if f.type == h2.GOAWAY]
    assert goaway.error_code == ENHANCE_YOUR_CALM and b"too_many_pings" in goaway.payload


START = h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
# (bytes, then the end of the client's stream): the server must close on the junk itself, except
# for a frame cut short, which only the end of the stream tells from a slow one
JUNK = {
    "HTTP/1.1 instead of the preface": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "random bytes after the preface": (h2.PREFACE + os.urandom(64), False),
    "a frame over the size limit": (
        START + b"\xff\xff\xff" + bytes([h2.DATA, 0]) + (1).to_bytes(4, "big"),
        False,
    ),
    "a header block that does not decode": (START + h2.frame(h2.HEADERS, 0x5, 1, b"\xff" * 8), False),
    "a frame cut short": (START + h2.frame(h2.HEADERS, 0x4, 1, h2.grpc_headers())[:20], True),
}


@pytest.mark.parametrize(("junk", "then_end"), JUNK.values(), ids=JUNK.keys())
def test_junk_closes_its_own_connection_while_others_are_served(
    limited: ServerThread, junk: bytes, then_end: bool
) -> None:
    with h2.Connection(limited.running.port) as conn:
        conn.send(junk[:10])  # the connection is open and half-way through its junk
        assert served(limited)
        conn.send(junk[10:])
        if then_end:
            conn.sock.shutdown(socket.SHUT_WR)
        frames = conn.frames_until_closed()
    assert not any(f.type == h2.DATA for f in frames)  # no call ran
    assert served(limited)
