"""Several server processes on one port: `python -m service --workers N`.

    exit_code = run_workers(config)      # service/__main__.py, when config.server.workers > 1

Why: one server process runs gRPC's Python per-call work on one event loop, which shares the
interpreter lock with the decode loops' bookkeeping (docs/call-cost.md, docs/benchmarks.md).
Worker processes each have their own interpreter, as in gRPC's own multiprocessing example.

This process is the supervisor. It
- reserves the gRPC port (a socket bound with SO_REUSEPORT, never listening, so that port 0
  resolves to one free port for all) and spawns the workers, each a whole server
  (service/server.py: gRPC, health, scheduler, engine) listening on it with SO_REUSEPORT: the
  kernel hands each new connection to one of them, and a connection's calls stay on its worker;
- serves every worker's metrics on the metrics port, added up (prometheus-client's multiprocess
  mode: the workers write their values to files in a private directory, which the supervisor
  reads at each scrape; gauges are the live workers' sum, the model-info gauge their maximum);
- logs "serving … port=P metrics_port=M" once every worker is SERVING;
- on SIGTERM or SIGINT, passes it on to every worker, which drains as a lone server would
  (health NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish within the grace period),
  and exits 0 once all have exited 0;
- with TLS on, passes SIGHUP on as well: each worker re-reads its certificate files;
- if a worker dies on its own after it served (killed, out of memory, a crash in native code),
  restarts that worker alone while the others keep serving: the restarted one loads and warms the
  model up first and only then listens on the shared port, so no client sees it warming up. Calls
  that were on the dead worker's connections fail UNAVAILABLE, which clients retry (the client
  library's retry policy); the kernel sends their new connections to the workers that listen;
- stops the server (every worker drained) and exits 1 when restarts do not help: a worker dying
  while the server first starts (it would again), a worker failing to start with a setup error,
  or more than --worker-restarts restarts within WORKER_RESTART_WINDOW_S (a crash loop: the
  process manager then restarts the whole server with its own backoff, and shows it);
- prints a worker's start-up error (a missing model directory, a checksum mismatch, CUDA asked for
  but absent) as one line and exits 1, as a lone server does.

Why restart rather than exit on a worker's death: the other workers' calls in flight finish and the
replica stays ready, where exiting would fail every call of every worker and take the replica out
of the balancer (Kubernetes: a container restart, then CrashLoopBackOff's growing delays; compose:
`restart: unless-stopped`) for as long as all the workers need to load again (docs/deploy.md).

The workers split the cores and the scheduler limits evenly (config.resolve_parallelism,
scheduler.pool.instance_config). Each worker loads its own copy of the model. Health is each
worker's own: a client asking reaches the worker its connection landed on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from prometheus_client import CollectorRegistry, multiprocess

from service.config import WORKER_RESTART_WINDOW_S, Config
from service.server import (
    SERVICE,
    STARTUP_ERRORS,
    ListenError,
    RunningServer,
    describe_model,
    listen_for_metrics,
    serve,
    setup_logging,
)

log = logging.getLogger(__name__)

# prometheus-client reads it when a worker first imports it: values then go to files there.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker whose drain outlives this after the signal is killed: the drain itself takes at most
# the grace period twice (the scheduler's drain, then the gRPC server's stop), plus shutdown.
_STOP_MARGIN_S = 15.0


class WorkerStartupError(Exception):
    """A worker could not start: its setup error (server.STARTUP_ERRORS), passed on as its message."""


def run_workers(config: Config) -> int:
    """Run `config.server.workers` worker processes until a signal, restarting a worker that dies
    (see the module docstring); returns the process's exit code: 0 after a clean stop, 1 otherwise.

    Raises:
        ListenError: the gRPC or metrics port cannot be bound.
        WorkerStartupError: a worker failed to start (its message says why).
    """
    server = config.server
    with (
        _reserved_port(server.host, server.port) as port,
        tempfile.TemporaryDirectory(prefix="translator-metrics-") as metrics_dir,
    ):
        os.environ[MULTIPROC_DIR_ENV] = metrics_dir  # inherited by the workers spawned below
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        metrics_server = listen_for_metrics(registry, server)
        try:
            worker_config = replace(config, server=replace(server, port=port))
            return _Supervisor(worker_config, metrics_dir, metrics_server.port).run()
        finally:
            metrics_server.close()


# What a worker sends its supervisor, once: ("serving", the model's description) or ("error", why).
_SERVING, _ERROR = "serving", "error"


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    messages: Connection  # the worker's one message arrives here
    serving: bool = False


class _Supervisor:
    def __init__(self, config: Config, metrics_dir: str, metrics_port: int) -> None:
        self.config, self.metrics_dir, self.metrics_port = config, metrics_dir, metrics_port
        self.stop_requested = threading.Event()
        self.workers: list[_Worker] = []
        self.started = False  # every worker has served once: from then on a dead one is restarted
        self.restarts: collections.deque[float] = collections.deque()  # monotonic times, in the window
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        if self.config.security.tls_cert is not None:  # SIGHUP: each worker re-reads the TLS files
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._pass_on)
        try:
            self.workers = [self._spawn(index, restart=False) for index in range(self.config.server.workers)]
            code = self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested.set()

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        for worker in self.workers:
            if worker.process.pid is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signum)

    def _spawn(self, index: int, *, restart: bool) -> _Worker:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main,
            args=(self.config, index, send, os.getpid(), restart),
            name=f"translator-worker-{index}",
        )
        process.start()
        send.close()  # the worker holds the writing end
        return _Worker(index, process, receive)

    def _supervise(self) -> int:
        """Wait for the workers to serve, then for a signal, restarting workers that die; then stop
        them all. Raises WorkerStartupError when one cannot start."""
        while not self.stop_requested.is_set():
            watched: list[Connection | int] = [w.process.sentinel for w in self.workers]
            watched += [w.messages for w in self.workers if not w.serving]
            ready = wait(watched, timeout=0.2)
            for worker in self.workers:
                # A dying worker's message is read before its death is handled: it may say why.
                if not worker.serving and (worker.messages in ready or worker.process.sentinel in ready):
                    self._read_message(worker)
            for worker in [w for w in self.workers if w.process.sentinel in ready]:
                if not self._replace_dead(worker):
                    self._stop()
                    return 1
        log.info("shutting down: %d workers draining", len(self.workers))
        return 0 if self._stop() else 1

    def _read_message(self, worker: _Worker) -> None:
        if not worker.messages.poll():
            return
        try:
            kind, text = worker.messages.recv()
        except EOFError:  # it died before saying anything: its sentinel says so
            return
        if kind == _ERROR:
            self._stop()
            raise WorkerStartupError(text)
        worker.serving = True
        if self.started:
            log.info("worker %d (pid %s) restarted and serving", worker.index, worker.process.pid)
        elif all(w.serving for w in self.workers):
            self.started = True
            log.info(
                "serving %s on %s port=%d metrics_port=%d (%d workers; %s)",
                SERVICE,
                self.config.server.host,
                self.config.server.port,
                self.metrics_port,
                len(self.workers),
                text,
            )

    def _replace_dead(self, worker: _Worker) -> bool:
        """Restart a worker that died, if the restart policy allows; False: stop the server."""
        worker.process.join(5)  # its sentinel can fire before it can be reaped
        code, pid = worker.process.exitcode, worker.process.pid
        if pid is not None:  # its live gauges leave the sum; its counters stay in it
            multiprocess.mark_process_dead(pid, self.metrics_dir)
        worker.messages.close()
        if not self.started:
            log.error(
                "worker %d (pid %s) exited with code %s while starting: stopping", worker.index, pid, code
            )
            return False
        now, limit = time.monotonic(), self.config.server.worker_restarts
        while self.restarts and now - self.restarts[0] > WORKER_RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= limit:
            log.error(
                "worker %d (pid %s) exited with code %s, after %d restarts within %.0f s "
                "(--worker-restarts %d): stopping the server",
                worker.index,
                pid,
                code,
                len(self.restarts),
                WORKER_RESTART_WINDOW_S,
                limit,
            )
            return False
        self.restarts.append(now)
        log.error(
            "worker %d (pid %s) exited with code %s: restarting it (restart %d of %d allowed within %.0f s)",
            worker.index,
            pid,
            code,
            len(self.restarts),
            limit,
            WORKER_RESTART_WINDOW_S,
        )
        self.workers[self.workers.index(worker)] = self._spawn(worker.index, restart=True)
        return True

    def _stop(self) -> bool:
        """SIGTERM every live worker and wait for them all; True if every worker exited 0 (or, not
        serving yet, was ended by that SIGTERM)."""
        for worker in self.workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2 * self.config.server.grace_period_s + _STOP_MARGIN_S
        clean = True
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d did not stop in time: killed", worker.index)
                worker.process.kill()
                worker.process.join()
            code = worker.process.exitcode
            clean = clean and (code == 0 or (not worker.serving and code == -signal.SIGTERM))
            if worker.process.pid is not None:
                multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)
            worker.messages.close()
        return clean


def _worker_main(config: Config, index: int, messages: Connection, supervisor: int, restart: bool) -> None:
    """A worker process: a whole server on the shared port until SIGTERM from the supervisor. A
    restarted one listens only once warm (its siblings serve meanwhile)."""
    import asyncio

    # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which passes it on
    # once (a second SIGINT during the drain would interrupt it).
    os.setpgrp()
    setup_logging(config.server, worker=index)

    def started(running: RunningServer) -> None:
        messages.send((_SERVING, describe_model(running.engine.model())))
        messages.close()

    try:
        asyncio.run(
            serve(
                config,
                worker=index,
                started=started,
                orphaned=lambda: os.getppid() != supervisor,
                listen_when_warm=restart,
            )
        )
    except STARTUP_ERRORS as err:  # the supervisor prints it, once, as a lone server would
        messages.send((_ERROR, str(err)))
        sys.exit(1)


@contextlib.contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """A socket bound to (host, port) with SO_REUSEPORT for the workers' lifetime; yields the port
    (the free one chosen when `port` is 0). It never listens, so it takes no connections."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ListenError("--workers > 1 needs SO_REUSEPORT (Linux, the BSDs, macOS)")
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise ListenError(f"cannot listen on {host}:{port}: {err.strerror}") from err
        yield int(sock.getsockname()[1])
