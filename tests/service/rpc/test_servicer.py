"""service.rpc.servicer's pure parts: what a status message may carry."""

from __future__ import annotations

import grpc

from service.rpc.requests import InvalidRequestError
from service.rpc.servicer import MAX_MESSAGE_BYTES, status_of


def test_a_status_message_is_cut_to_its_byte_bound_on_a_character_boundary() -> None:
    code, message = status_of(InvalidRequestError("é" * 5_000))  # 2 bytes each in UTF-8
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message.encode("utf-8")) <= MAX_MESSAGE_BYTES and message.endswith("é…")
    assert status_of(InvalidRequestError("short"))[1] == "short"


def test_an_unexpected_error_says_nothing_of_itself() -> None:
    assert status_of(RuntimeError("secret path /etc")) == (
        grpc.StatusCode.INTERNAL,
        "internal error while translating; see the server log",
    )
