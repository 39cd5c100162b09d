"""Render the load balancer's and Prometheus's configuration from their templates, for compose or tests.

    python -m deploy.render           # rewrite deploy/nginx/nginx.conf, deploy/prometheus/prometheus.yml
    python -m deploy.render --check   # exit 1 if either differs from what the templates give

One renderer, two topologies: `compose_nginx()` / `compose_prometheus()` describe the replicas of
deploy/docker-compose.yml (found through Docker's DNS, re-resolved as they scale), whose rendered
files are committed next to their templates; `local_nginx()` / `local_prometheus()` point the same
templates at replicas on loopback ports (tests/deploy/test_topology.py runs those). A test keeps the
committed files equal to `compose_*()` rendered, so they never drift from the templates.

Templates hold `{{ name }}` fields; every field must be given and every value used.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
NGINX_TEMPLATE = DEPLOY_DIR / "nginx" / "nginx.conf.template"
NGINX_CONF = DEPLOY_DIR / "nginx" / "nginx.conf"
PROMETHEUS_TEMPLATE = DEPLOY_DIR / "prometheus" / "prometheus.yml.template"
PROMETHEUS_CONF = DEPLOY_DIR / "prometheus" / "prometheus.yml"
RULES_FILE = DEPLOY_DIR / "prometheus" / "alerts.yml"

# The compose topology: the replicas' service name (a DNS name answering every replica's address) and
# their ports (TRANSLATOR_PORT / TRANSLATOR_METRICS_PORT in deploy/docker-compose.yml), the port nginx
# listens on, Docker's embedded DNS server.
SERVICE_NAME = "translator"
GRPC_PORT = 50051
METRICS_PORT = 9090
BALANCER_PORT = 50051
PROMETHEUS_PORT = 9090
DOCKER_DNS = "127.0.0.11"

# nginx's passive health: one failed connection (refused, reset, timed out) takes a replica out of
# rotation for 10 s; then one request probes it again (and goes to another replica if it fails).
PASSIVE_HEALTH = "max_fails=1 fail_timeout=10s"

DESCRIPTION = "Render deploy/'s nginx and Prometheus configuration for docker compose from the templates."
_FIELD = re.compile(r"\{\{ *([A-Za-z_][A-Za-z0-9_]*) *\}\}")


@dataclass(frozen=True)
class NginxConfig:
    """What differs between the balancer of compose and the one of the tests.

    Attributes:
        listen: the address (or port) nginx accepts gRPC on.
        servers: "host:port" of each replica's gRPC port (compose: the service name, once).
        resolver: a DNS server nginx re-resolves `servers` with (every 5 s, each name to all its
            addresses, `resolve`: nginx >= 1.27.3); None: addresses resolved once, at start.
        http2_directive: spell HTTP/2 `http2 on;` (nginx >= 1.25.1) rather than `listen ... http2`
            (the only spelling of older nginx, e.g. Debian 12's 1.22, which the tests run).
        runtime_dir: a directory nginx may write: its pid file and temporary files.
        access_log: where the access log goes.
    """

    listen: str
    servers: tuple[str, ...]
    resolver: str | None
    http2_directive: bool
    runtime_dir: str
    access_log: str


@dataclass(frozen=True)
class PrometheusConfig:
    """What differs between the Prometheus of compose and the one of the tests.

    Attributes:
        scrape_interval, scrape_timeout, evaluation_interval: Prometheus durations ("5s").
        rules_file: the alert rules' path as Prometheus sees it (relative: to the config file).
        dns_name: find the replicas as every address of this DNS name (compose); None: `static_targets`.
        metrics_port: the replicas' metrics port, with `dns_name`.
        static_targets: "host:port" of each replica's metrics endpoint, without `dns_name`.
        self_address: "host:port" Prometheus listens on (it scrapes itself there).
    """

    scrape_interval: str
    scrape_timeout: str
    evaluation_interval: str
    rules_file: str
    dns_name: str | None
    metrics_port: int
    static_targets: tuple[str, ...]
    self_address: str


def compose_nginx() -> NginxConfig:
    """The balancer of deploy/docker-compose.yml: every replica behind the service's DNS name."""
    return NginxConfig(
        listen=str(BALANCER_PORT),
        servers=(f"{SERVICE_NAME}:{GRPC_PORT}",),
        resolver=DOCKER_DNS,
        http2_directive=True,
        runtime_dir="/var/cache/nginx",  # the official image's, writable by its nginx user
        access_log="/dev/stdout",
    )


def compose_prometheus() -> PrometheusConfig:
    """The Prometheus of deploy/docker-compose.yml: every replica found through Docker's DNS."""
    return PrometheusConfig(
        scrape_interval="5s",
        scrape_timeout="5s",
        evaluation_interval="5s",
        rules_file="alerts.yml",  # mounted next to the configuration, in /etc/prometheus
        dns_name=SERVICE_NAME,
        metrics_port=METRICS_PORT,
        static_targets=(),
        self_address=f"localhost:{PROMETHEUS_PORT}",
    )


def local_nginx(listen_port: int, grpc_ports: Sequence[int], runtime_dir: Path) -> NginxConfig:
    """The balancer on 127.0.0.1:`listen_port` in front of replicas on 127.0.0.1:`grpc_ports`."""
    return NginxConfig(
        listen=f"127.0.0.1:{listen_port}",
        servers=tuple(f"127.0.0.1:{port}" for port in grpc_ports),
        resolver=None,
        http2_directive=False,
        runtime_dir=str(runtime_dir),
        access_log=str(runtime_dir / "access.log"),
    )


def local_prometheus(
    listen_port: int, metrics_ports: Sequence[int], *, interval: str = "1s", rules_file: Path = RULES_FILE
) -> PrometheusConfig:
    """Prometheus on 127.0.0.1:`listen_port` scraping replicas on 127.0.0.1:`metrics_ports`."""
    return PrometheusConfig(
        scrape_interval=interval,
        scrape_timeout=interval,
        evaluation_interval=interval,
        rules_file=str(rules_file),
        dns_name=None,
        metrics_port=0,
        static_targets=tuple(f"127.0.0.1:{port}" for port in metrics_ports),
        self_address=f"127.0.0.1:{listen_port}",
    )


def fill(template: str, values: Mapping[str, str]) -> str:
    """`template` with each `{{ name }}` replaced by `values[name]`.

    Raises:
        KeyError: a field of the template has no value, or a value no field.
    """
    fields = set(_FIELD.findall(template))
    missing, unused = fields - values.keys(), values.keys() - fields
    if missing or unused:
        raise KeyError(f"template fields without a value: {sorted(missing)}; values unused: {sorted(unused)}")
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def render_nginx(config: NginxConfig, template: str | None = None) -> str:
    """nginx.conf for `config` (from deploy/nginx/nginx.conf.template unless `template` is given)."""
    if not config.servers:
        raise ValueError("the balancer needs at least one server")
    resolve = " resolve" if config.resolver is not None else ""
    servers = "\n".join(f"        server {s}{resolve} {PASSIVE_HEALTH};" for s in config.servers)
    resolver = ""
    if config.resolver is not None:
        resolver = (
            "\n    # Docker's DNS: the service name answers every replica's address; re-asked every 5 s\n"
            "    # (`resolve` below), so replicas that come and go (--scale, restarts) join and leave.\n"
            f"    resolver {config.resolver} valid=5s ipv6=off;\n"
        )
    if config.http2_directive:
        listen = f"        listen {config.listen};\n        http2 on;"
    else:
        listen = f"        listen {config.listen} http2;"
    values = {
        "runtime_dir": config.runtime_dir,
        "access_log": config.access_log,
        "resolver": resolver,
        "servers": servers,
        "listen": listen,
    }
    return fill(NGINX_TEMPLATE.read_text() if template is None else template, values)


def render_prometheus(config: PrometheusConfig, template: str | None = None) -> str:
    """prometheus.yml for `config` (from deploy/prometheus/prometheus.yml.template unless given)."""
    if config.dns_name is not None:
        targets = (
            "    # Docker's DNS answers the service name with every replica's address (A records),\n"
            "    # re-asked every refresh_interval: `docker compose up --scale` adds targets, and\n"
            "    # removes them.\n"
            "    dns_sd_configs:\n"
            f'      - names: ["{config.dns_name}"]\n'
            "        type: A\n"
            f"        port: {config.metrics_port}\n"
            "        refresh_interval: 5s"
        )
    elif config.static_targets:
        listed = ", ".join(f'"{t}"' for t in config.static_targets)
        targets = f"    static_configs:\n      - targets: [{listed}]"
    else:
        raise ValueError("Prometheus needs a DNS name or static targets for the replicas")
    values = {
        "scrape_interval": config.scrape_interval,
        "scrape_timeout": config.scrape_timeout,
        "evaluation_interval": config.evaluation_interval,
        "rules_file": config.rules_file,
        "translator_targets": targets,
        "self_address": config.self_address,
    }
    return fill(PROMETHEUS_TEMPLATE.read_text() if template is None else template, values)


def compose_files() -> dict[Path, str]:
    """The committed, rendered-for-compose files and their contents as the templates give them."""
    return {
        NGINX_CONF: _generated(NGINX_TEMPLATE) + render_nginx(compose_nginx()),
        PROMETHEUS_CONF: _generated(PROMETHEUS_TEMPLATE) + render_prometheus(compose_prometheus()),
    }


def _generated(template: Path) -> str:
    return (
        f"# GENERATED by `python -m deploy.render` from {template.name}: edit the template, not this file.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.render", description=DESCRIPTION)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a rendered file is out of date"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, text in compose_files().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
            print(f"wrote {path.relative_to(DEPLOY_DIR.parent)}")
    if args.check and stale:
        names = ", ".join(str(p.relative_to(DEPLOY_DIR.parent)) for p in stale)
        print(f"out of date (run python -m deploy.render): {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
