"""Bearer-token authentication: a server interceptor that refuses calls without a known token.

    tokens = load_tokens(config.security)           # () when none is configured; ConfigError: bad file
    interceptor = TokenAuth(tokens, config.security.auth_exempt_services)

A call must send the metadata `authorization: Bearer <token>` with one of the tokens, or it ends
UNAUTHENTICATED before its handler runs: unary calls and streams alike (the interceptor swaps the
method's handler for one that aborts). The services in `auth_exempt_services` (health and reflection
by default) are served without a token. Tokens are compared as SHA-256 digests with
`hmac.compare_digest`, against every token each time: neither the time a refusal takes nor what is
kept in memory depends on how much of a token was right. No token is ever logged or counted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from service.config import ConfigError, SecurityConfig, check_tokens

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
SCHEME = "bearer"  # compared without case, as HTTP does
MISSING = "missing bearer token: send the metadata 'authorization: Bearer <token>'"
WRONG = "invalid bearer token"


def load_tokens(security: SecurityConfig) -> tuple[str, ...]:
    """The tokens of TRANSLATOR_AUTH_TOKENS and of --auth-tokens-file together.

    The file holds one token per line; blank lines and lines starting with '#' are skipped.

    Raises:
        ConfigError: the file cannot be read, holds no token, or a token that is too short or not
            printable ASCII (the message gives the line number, never the token).
    """
    tokens = list(security.auth_tokens)
    path = security.auth_tokens_file
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"--auth-tokens-file {path}: cannot read it: {reason}") from None
        found = [(n, line.strip()) for n, line in enumerate(lines, 1)]
        found = [(n, t) for n, t in found if t and not t.startswith("#")]
        if not found:
            raise ConfigError(f"--auth-tokens-file {path}: no token in it (one per line)")
        for n, token in found:
            try:
                check_tokens([token])
            except ValueError as err:
                raise ConfigError(f"--auth-tokens-file {path}, line {n}: {err}") from None
        tokens += [t for _, t in found]
    return tuple(tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call to a service not in `exempt` that lacks a known token.

    Args:
        tokens: the accepted bearer tokens (non-empty).
        exempt: full service names served without a token (e.g. "grpc.health.v1.Health").
    """

    def __init__(self, tokens: Sequence[str], exempt: Iterable[str]) -> None:
        assert tokens, "TokenAuth without tokens would refuse every call"
        self._digests = tuple(_digest(t) for t in tokens)
        self._exempt = frozenset(exempt)

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when `metadata` carries an accepted token, else why not (MISSING or WRONG)."""
        values = [v for k, v in metadata or () if k == AUTHORIZATION]
        if len(values) != 1 or not isinstance(values[0], str):
            return MISSING
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            return MISSING
        given, match = _digest(token.strip()), False
        for digest in self._digests:  # every one, without stopping at a match
            match |= hmac.compare_digest(given, digest)
        return None if match else WRONG

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or method.lstrip("/").split("/")[0] in self._exempt:
            return handler
        reason = self.check(details.invocation_metadata)
        if reason is None:
            return handler
        log.info(
            "refused %s: UNAUTHENTICATED (%s)", method, "no token" if reason == MISSING else "wrong token"
        )
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming, either way) that aborts."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        # a response stream's handler is an async generator (what an interceptor wrapping it iterates)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # never reached: abort raises

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make: Callable[..., grpc.RpcMethodHandler] = kinds[
        (bool(handler.request_streaming), bool(handler.response_streaming))
    ]
    return make(
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
