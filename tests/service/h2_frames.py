"""Raw HTTP/2 on a loopback socket, written by hand (RFC 9113 frames, RFC 7541 HPACK literals).

Enough to talk to the gRPC port as a misbehaving client would: the connection preface, SETTINGS,
HEADERS whose fields are HPACK literals (never indexed, never Huffman-coded: any decoder accepts
them), DATA carrying gRPC's length-prefixed messages, and a reader of the frames the server sends
back. The server's own header blocks are not decoded (that needs HPACK's tables and Huffman code):
a test reads what it needs from frame types, flags, stream ids and error codes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM = 0x7
TRANSLATE = "/translator.v1.Translator/Translate"


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes

    @property
    def error_code(self) -> int:
        """RST_STREAM's error code, or GOAWAY's (after the last stream id)."""
        offset = 4 if self.type == GOAWAY else 0
        return int(struct.unpack_from(">I", self.payload, offset)[0])

    def settings(self) -> dict[int, int]:
        """A SETTINGS frame's parameters, id → value."""
        pairs = (struct.unpack_from(">HI", self.payload, i) for i in range(0, len(self.payload), 6))
        return dict(pairs)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _integer(value: int, prefix_bits: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 §5.1), the prefix's other bits zero."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def header_block(fields: Iterable[tuple[str, str]]) -> bytes:
    """Each field as a literal without indexing, with a literal name (0x00, §6.2.2), no Huffman."""
    out = bytearray()
    for name, value in fields:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _integer(len(n), 7) + n + _integer(len(v), 7) + v
    return bytes(out)


def grpc_headers(path: str = TRANSLATE, **extra: str) -> bytes:
    """The request header block of a gRPC call to `path` (plus any `extra` fields)."""
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra.items(),
    ]
    return header_block(fields)


def grpc_message(payload: bytes, *, announced: int | None = None) -> bytes:
    """A gRPC length-prefixed message (uncompressed); `announced` lies about its length."""
    return struct.pack(">BI", 0, len(payload) if announced is None else announced) + payload


class Connection:
    """A raw HTTP/2 client connection: `send` bytes, `read` frames, `closed` waits for the end."""

    def __init__(self, port: int, *, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start(self) -> Frame:
        """Preface and an empty SETTINGS; the server's SETTINGS frame (acknowledged)."""
        self.send(PREFACE + frame(SETTINGS, 0, 0))
        settings = self.read_until(lambda f: f.type == SETTINGS and not f.flags & ACK)
        assert settings is not None, "the server sent no SETTINGS"
        self.send(frame(SETTINGS, ACK, 0))
        return settings

    def open_stream(self, stream: int, *, end_stream: bool, path: str = TRANSLATE) -> None:
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        self.send(frame(HEADERS, flags, stream, grpc_headers(path)))

    def read(self) -> Frame | None:
        """The next frame, or None once the server has closed the connection (or reset it)."""
        header = self._exactly(9)
        if header is None:
            return None
        length = int.from_bytes(header[:3], "big")
        kind, flags, stream = struct.unpack(">BBI", header[3:])
        payload = self._exactly(length)
        if payload is None:
            return None
        if kind == PING and not flags & ACK:  # answer pings, as every client must
            self.send(frame(PING, ACK, 0, payload))
        return Frame(kind, flags, stream & 0x7FFFFFFF, payload)

    def read_until(self, wanted: object) -> Frame | None:
        """Frames until `wanted(frame)` holds (that frame), or None when the connection ends first."""
        assert callable(wanted)
        while (f := self.read()) is not None:
            if wanted(f):
                return f
        return None

    def frames_until_closed(self) -> list[Frame]:
        """Every frame until the server closes the connection."""
        frames = []
        while (f := self.read()) is not None:
            frames.append(f)
        return frames

    def _exactly(self, n: int) -> bytes | None:
        while len(self._buffer) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data
