"""A real server on a loopback port, run on its own event loop in a thread, for synchronous tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from service.config import Config, SchedulerConfig, ServerConfig
from service.engine.engine import Engine
from service.server import RunningServer, start_server


def loopback_config(**scheduler: object) -> Config:
    """The default config on 127.0.0.1, free ports, a short grace period; scheduler fields overridable."""
    server = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_period_s=2.0)
    return Config(server=server, scheduler=replace(SchedulerConfig(), **scheduler))  # type: ignore[arg-type]


class ServerThread:
    """`start_server(config)` on a private event loop; `.running` is the RunningServer."""

    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self._config, self._engine = config, engine
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.running: RunningServer
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            self.running = await start_server(self._config, engine=self._engine)
        except BaseException as err:
            self._error = err
            raise
        finally:
            self._ready.set()
        await self._stop.wait()
        await self.running.stop(grace=1.0)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise RuntimeError("the server did not start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @contextlib.contextmanager
    def loop_held(self) -> Iterator[None]:
        """While in the block, the server's event loop is stopped in a callback: gRPC still takes
        calls in (its own threads), but none reaches the Python server until the block ends, as
        when an overloaded server's loop falls behind."""
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(60)

        self._loop.call_soon_threadsafe(hold)
        assert held.wait(30), "the server's event loop did not run the hold"
        try:
            yield
        finally:
            release.set()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds have passed; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


PACE_S = 0.1  # paced_steps: the wait before each decoder step; the longest decode (128 steps) 12.8 s


@contextlib.contextmanager
def paced_steps(engine: Any) -> Iterator[None]:
    """While in the block, each decoder step of `engine` first waits PACE_S: a long call is still
    decoding when the test looks, however slowly the machine runs the test, while the scheduler
    still sweeps its queue and retires cancelled or expired requests between steps (which a held
    step would stop). Once out of the block, the steps run at full speed again."""
    step, done = engine.step, threading.Event()

    def paced(*args: Any, **kwargs: Any) -> Any:
        done.wait(PACE_S)
        return step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "step", paced)
        try:
            yield
        finally:
            done.set()


@contextlib.contextmanager
def held_step(engine: Any) -> Iterator[threading.Event]:
    """While in the block, the first decoder step of `engine` waits until the block ends: the
    running batch and the queue stay as they are (nothing joins, nothing is swept). Yields the
    event set once the decode thread is in that step."""
    step, held_up, release = engine.step, threading.Event(), threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        if not held_up.is_set():
            held_up.set()
            release.wait(60)
        return step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "step", held)
        try:
            yield held_up
        finally:
            release.set()
