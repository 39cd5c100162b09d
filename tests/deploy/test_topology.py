"""The compose topology, for real but without Docker: replicas, nginx and Prometheus as local processes.

Three `python -m service` servers on loopback ports (one of them 2 worker processes, `--workers 2`),
nginx with the configuration rendered from deploy/nginx/nginx.conf.template (the template of the
compose file's) pointed at them, and Prometheus
with deploy/prometheus/prometheus.yml.template rendered for them (1 s scrapes) and the repository's
alert rules. The tests then run in order on that one topology (module-scoped: starting it is most of
the time): traffic reaches every replica through nginx; a replica killed (SIGKILL) or stopped
(SIGTERM) mid-load loses no request of clients that retry (service/client/client.py's retry policy);
Prometheus scraped every replica,
every query of every panel of the Grafana dashboard returns data, and the alert rules are loaded
and evaluate (the killed replica's TranslatorReplicaDown is pending).

Needs Debian's nginx and prometheus packages: skipped without them, failed under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from deploy.render import local_nginx, local_prometheus, render_nginx, render_prometheus
from service.client import TranslatorClient, TranslatorError
from tests.deploy.test_compose import prometheus_flags
from tests.deploy.tools import DEPLOY, REPO, free_port, require_binary

REPLICAS = 3
# This replica runs 2 worker processes (--workers) under their supervisor: the stopped one below,
# so that a SIGTERM drains both workers behind nginx; its metrics are the workers' sum.
WORKERS_REPLICA = 1
STARTUP_TIMEOUT_S = 120.0  # three servers warming up at once on a busy 2-core machine
SENTENCES = ("I love cats.", "The dog is small.", "We like the red house.", "She reads a book.")
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "translator.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
# What the dashboard's template variables become in the queries sent here: Grafana's
# $__rate_interval is at least 4 scrape intervals; 1m spans the whole test's traffic.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$instance": ".*"}

DOWN_ALERT = "TranslatorReplicaDown"

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Calls `probe` until it returns something other than None (exceptions count as None)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = probe()
            if result is not None:
                return result
        except Exception as err:  # the thing is not up yet
            last_error = err
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})"
            )
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s; always reaps it."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Replica:
    process: Process
    grpc_port: int
    metrics_port: int

    @property
    def instance(self) -> str:
        """Prometheus's `instance` label of this replica."""
        return f"127.0.0.1:{self.metrics_port}"

    def counter(self, name: str, **labels: str) -> float:
        """The current value of one sample of this replica's /metrics (0 when absent)."""
        text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics").decode()
        for line in text.splitlines():
            match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
            if match is None or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(3))
        return 0.0

    def translated(self) -> float:
        return self.counter("translator_requests_total", rpc="Translate", code="OK")


@dataclass
class Topology:
    replicas: list[Replica]
    balancer: str  # host:port of nginx
    prometheus: str  # http://host:port
    processes: list[Process] = field(default_factory=list)
    killed: list[Replica] = field(default_factory=list)

    def diagnostics(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result of an instant PromQL query (a vector's samples; a scalar as one sample)."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def api(self, path: str) -> Any:
        body = json.loads(http_get(f"{self.prometheus}/api/v1/{path}"))
        assert body["status"] == "success", body
        return body["data"]


def _start(name: str, argv: list[str], log: Path, cwd: Path = REPO) -> Process:
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Process(name, popen, log)


def _alive(process: Process) -> None:
    if process.popen.poll() is not None:
        raise RuntimeError(f"{process.name} exited with {process.popen.returncode}\n{process.tail()}")


def _start_replica(index: int, tmp: Path) -> Process:
    # Port 0: the server picks free ports and logs them (no race with other processes for them).
    argv = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    argv += ["--intra-op-threads", "1", "--grace-period-s", "1"]
    if index == WORKERS_REPLICA:
        argv += ["--workers", "2"]
    return _start(f"replica {index}", argv, tmp / f"replica{index}.log")


def _replica_ready(process: Process) -> Replica:
    """Waits for the server's "serving ... port=P metrics_port=M" line, then for health SERVING."""

    def ports() -> tuple[int, int] | None:
        _alive(process)
        match = re.search(r"port=(\d+) metrics_port=(\d+)", process.log.read_text(errors="replace"))
        return (int(match.group(1)), int(match.group(2))) if match else None

    grpc_port, metrics_port = wait_for(f"{process.name} to listen", ports, STARTUP_TIMEOUT_S)
    with TranslatorClient(f"127.0.0.1:{grpc_port}", timeout=5) as client:
        wait_for(f"{process.name} to serve", lambda: client.health() == "SERVING" or None, STARTUP_TIMEOUT_S)
    return Replica(process, grpc_port, metrics_port)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    nginx = require_binary("nginx", "nginx")
    prometheus = require_binary("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("topology")
    processes: list[Process] = []
    try:
        # The replicas warm up together; then the balancer and Prometheus, rendered for their ports.
        starting = [_start_replica(i, tmp) for i in range(REPLICAS)]
        processes += starting
        replicas = [_replica_ready(p) for p in starting]

        nginx_dir = tmp / "nginx"
        nginx_dir.mkdir()
        nginx_port = free_port()
        conf = nginx_dir / "nginx.conf"
        conf.write_text(render_nginx(local_nginx(nginx_port, [r.grpc_port for r in replicas], nginx_dir)))
        # -p: relative paths under nginx_dir; -e: the error log before the configuration is read;
        # `daemon off`: stays in the foreground as this child process (the compose image does too).
        nginx_argv = [nginx, "-p", str(nginx_dir), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
        check = subprocess.run([*nginx_argv, "-t"], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, f"nginx -t rejected the rendered configuration:\n{check.stderr}"
        processes.append(_start("nginx", nginx_argv, nginx_dir / "nginx.log"))

        prom_dir = tmp / "prometheus"
        prom_dir.mkdir()
        prom_port = free_port()
        prom_conf = prom_dir / "prometheus.yml"
        prom_conf.write_text(
            render_prometheus(local_prometheus(prom_port, [r.metrics_port for r in replicas]))
        )
        prom_argv = [prometheus, f"--config.file={prom_conf}", f"--storage.tsdb.path={prom_dir / 'data'}"]
        prom_argv += [f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
        prom_argv += prometheus_flags()  # the compose file's other flags: run as compose runs it
        processes.append(_start("prometheus", prom_argv, prom_dir / "prometheus.log"))

        def balancer_up() -> bool | None:
            _alive(processes[-2])
            with TranslatorClient(f"127.0.0.1:{nginx_port}", timeout=5) as client:
                return client.health() == "SERVING" or None

        wait_for("nginx to pass gRPC through", balancer_up, 60)

        def prometheus_ready() -> bool | None:
            _alive(processes[-1])
            return http_get(f"http://127.0.0.1:{prom_port}/-/ready").startswith(b"Prometheus") or None

        wait_for("Prometheus to be ready", prometheus_ready, 60)
        topology = Topology(replicas, f"127.0.0.1:{nginx_port}", f"http://127.0.0.1:{prom_port}", processes)

        # Prometheus's first scrapes of the replicas (so that the one killed later was seen up).
        def every_replica_up() -> bool | None:
            up = {s["metric"]["instance"]: s["value"][1] for s in topology.query('up{job="translator"}')}
            return up == {r.instance: "1" for r in replicas} or None

        wait_for("Prometheus to scrape every replica", every_replica_up, 60)
    except BaseException as err:  # KeyboardInterrupt too: no process may outlive the tests
        logs = "\n".join(p.tail() for p in processes)
        for process in reversed(processes):
            process.stop()
        if isinstance(err, Exception):
            raise RuntimeError(f"the topology did not start: {err}\n{logs}") from err
        raise
    try:
        yield topology
    finally:
        for process in reversed(processes):
            process.stop()


def _translate_many(address: str, n: int) -> None:
    with TranslatorClient(address, timeout=30) as client:
        for i in range(n):
            (t,) = client.translate([SENTENCES[i % len(SENTENCES)]])
            assert t.text


def test_requests_land_on_every_replica(topology: Topology) -> None:
    before = [r.translated() for r in topology.replicas]
    n = 10 * REPLICAS
    _translate_many(topology.balancer, n)
    got = [r.translated() - b for r, b in zip(topology.replicas, before, strict=True)]
    assert sum(got) == n, f"{got}\n{topology.diagnostics()}"
    # Each RPC is balanced on its own over one client connection: every replica gets some.
    assert all(g > 0 for g in got), f"Translate RPCs per replica: {got}\n{topology.diagnostics()}"


@pytest.mark.parametrize(
    ("victim_index", "how"),
    [(0, signal.SIGKILL), (WORKERS_REPLICA, signal.SIGTERM)],
    ids=["killed", "stopped"],
)
def test_losing_a_replica_mid_load_loses_no_request(
    topology: Topology, victim_index: int, how: signal.Signals
) -> None:
    """SIGKILL (a crash: its calls in flight die, nginx answers UNAVAILABLE) or SIGTERM (`docker stop`:
    it drains, refusing new calls with UNAVAILABLE, then exits 0): the clients' retries lose nothing."""
    threads_n, stop = 6, threading.Event()
    done: list[int] = [0] * threads_n
    failures: list[str] = []

    def client_loop(k: int) -> None:
        # One channel per thread, with TranslatorClient's retry policy (4 attempts).
        with TranslatorClient(topology.balancer, timeout=30) as client:
            i = 0
            while not stop.is_set():
                try:
                    (t,) = client.translate([SENTENCES[(k + i) % len(SENTENCES)]])
                    assert t.text
                    done[k] += 1
                except (TranslatorError, AssertionError) as err:
                    failures.append(repr(err))
                i += 1

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(threads_n)]
    for t in threads:
        t.start()
    victim = topology.replicas[victim_index]
    others = [r for r in topology.replicas if r is not victim and r not in topology.killed]
    try:
        # Mid-load: the victim has been answering this load for a while.
        start = victim.translated()
        wait_for("load on the replica to go", lambda: victim.translated() >= start + 20 or None, 60)
        victim.process.popen.send_signal(how)
        code = victim.process.popen.wait(30)
        topology.killed.append(victim)
        at_loss = sum(done)
        others_at_loss = [r.translated() for r in others]
        wait_for("load to continue after the loss", lambda: sum(done) >= at_loss + 60 or None, 90)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a client call hung"
    assert not failures, f"{len(failures)} requests failed: {failures[:5]}\n{topology.diagnostics()}"
    if how == signal.SIGTERM:
        assert code == 0, f"the drained replica exited {code}\n{victim.process.tail()}"
    # The load the victim had went to the others: each of them served requests after the loss.
    served = [r.translated() - n for r, n in zip(others, others_at_loss, strict=True)]
    assert all(s > 0 for s in served), served


def test_prometheus_scraped_every_replica(topology: Topology) -> None:
    expected = {r.instance for r in topology.replicas}

    def every_replica_seen() -> dict[str, float] | None:
        samples = topology.query('max_over_time(up{job="translator"}[10m])')
        seen = {s["metric"]["instance"]: float(s["value"][1]) for s in samples}
        return seen if set(seen) == expected else None

    seen = wait_for("Prometheus to have scraped every replica", every_replica_seen, 30)
    assert all(v == 1 for v in seen.values()), seen
    # The killed replica is now down for Prometheus, the others up.
    killed = {r.instance for r in topology.killed}

    def current_up() -> dict[str, float] | None:
        samples = topology.query('up{job="translator"}')
        up = {s["metric"]["instance"]: float(s["value"][1]) for s in samples}
        wanted = {i: 0.0 if i in killed else 1.0 for i in expected}
        return up if up == wanted else None

    wait_for("up to be 0 for the killed replica only", current_up, 30)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with the template variables substituted) of every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in SUBSTITUTIONS.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"an unsubstituted variable in {panel['title']!r}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_every_dashboard_query_returns_data(topology: Topology) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 12
    empty: list[str] = []
    for title, expr in queries:

        def samples(expr: str = expr) -> list[dict[str, Any]] | None:
            result = topology.query(expr)
            # Data: at least one sample, and one that is a number (a quantile of nothing is NaN).
            return result if any(math.isfinite(float(s["value"][1])) for s in result) else None

        try:
            wait_for(f"data for {title!r}", samples, 20, interval=0.5)
        except TimeoutError:
            empty.append(f"{title}: {expr} -> {topology.query(expr)}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


def test_prometheus_loaded_and_evaluates_the_alert_rules(topology: Topology) -> None:
    # (`promtool check rules` on the file: tests/deploy/test_render.py.)
    expected = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}

    def evaluated() -> dict[str, dict[str, Any]] | None:
        groups = topology.api("rules")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = all(r["health"] != "unknown" for r in rules.values())
        return rules if set(rules) == expected and evaluated else None

    rules = wait_for("Prometheus to load and evaluate the alert rules", evaluated, 30)
    bad = {name: (r["health"], r.get("lastError")) for name, r in rules.items() if r["health"] != "ok"}
    assert not bad, bad

    # The killed replica is down: its TranslatorReplicaDown alert is pending (`for: 1m`) or firing.
    killed = {r.instance for r in topology.killed}

    def replica_down() -> set[str] | None:
        alerts = topology.api("alerts")["alerts"]
        down = {a["labels"]["instance"] for a in alerts if a["labels"]["alertname"] == DOWN_ALERT}
        return down if down == killed else None

    with contextlib.suppress(TimeoutError):
        wait_for("TranslatorReplicaDown for the killed replica", replica_down, 30)
    assert replica_down() == killed, topology.api("alerts")


def test_prometheus_refuses_its_lifecycle_api(topology: Topology) -> None:
    """Run with the compose file's flags, Prometheus answers POST /-/quit with 403 and stays up
    (with --web.enable-lifecycle anyone reaching its port could stop it). Last: it would end it."""
    for path in ("/-/quit", "/-/reload"):
        request = urllib.request.Request(f"{topology.prometheus}{path}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 403, path
    assert http_get(f"{topology.prometheus}/-/ready").startswith(b"Prometheus")
