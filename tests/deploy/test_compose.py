"""Static checks of deploy/docker-compose.yml and Grafana's provisioning and dashboard (no Docker here).

The compose file parses, every file and directory it refers to exists, its ports and names agree
with the rendered nginx / Prometheus configuration (deploy/render.py), images are pinned; its
security rules hold (secrets only from the git-ignored deploy/.env, whose committed template names
every variable; Prometheus's lifecycle API off; every container limited; the unauthenticated
monitoring published on loopback; host ports apart from `make run`'s); Grafana's provisioning files
parse and agree with the compose mounts; the dashboard is valid JSON whose every panel has a query
(tests/deploy/test_topology.py runs those queries, and Prometheus with the compose flags, for real).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import render
from service.config import ServerConfig
from tests.deploy.tools import DEPLOY, REPO

COMPOSE = DEPLOY / "docker-compose.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "translator.json"
REPLICA_SERVICES = ("translator", "translator-gpu")
ENV_EXAMPLE = DEPLOY / ".env.example"  # committed; deploy/.env, its filled-in copy, is git-ignored
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}: compose's interpolation
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
# Flags that would open Prometheus's unauthenticated write/stop endpoints to whoever reaches it.
UNSAFE_PROMETHEUS_FLAGS = (
    "--web.enable-lifecycle",
    "--web.enable-admin-api",
    "--web.enable-remote-write-receiver",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document = json.loads(DASHBOARD.read_text())
    assert isinstance(document, dict)
    return document


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount of a service (short syntax: "./a:/b:ro")."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((COMPOSE.parent / volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((COMPOSE.parent / source, target))
    return mounts


def _mount_of(service: dict[str, Any], host_path: Path) -> str:
    for source, target in _bind_mounts(service):
        if source.resolve() == host_path.resolve():
            return target
    raise AssertionError(f"{host_path} is not mounted")


def test_compose_parses_and_has_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*REPLICA_SERVICES, "nginx", "prometheus", "grafana"}


def test_every_referenced_file_exists(compose: dict[str, Any]) -> None:
    named_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = COMPOSE.parent / build["context"]
            assert context.is_dir(), f"{name}: build context {context}"
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        for source, _ in _bind_mounts(service):
            assert source.exists(), f"{name}: mounts {source}, which does not exist"
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in named_volumes, f"{name}: undeclared volume {volume}"
        for config in service.get("configs", []):
            source = config if isinstance(config, str) else config["source"]
            assert (COMPOSE.parent / compose["configs"][source]["file"]).is_file()
        for env_file in service.get("env_file", []):
            assert (COMPOSE.parent / env_file).is_file()


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue  # built here, tagged by the compose file
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned to a version"
    # `resolve` in the rendered nginx.conf (replicas re-resolved as they scale) needs nginx >= 1.27.3.
    version = re.search(r"nginx:(\d+)\.(\d+)\.(\d+)", compose["services"]["nginx"]["image"])
    assert version is not None
    assert tuple(int(v) for v in version.groups()) >= (1, 27, 3)


def test_replicas_profiles_and_gpu_reservation(compose: dict[str, Any]) -> None:
    cpu, gpu = (compose["services"][name] for name in REPLICA_SERVICES)
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    assert cpu["build"]["dockerfile"].endswith("Dockerfile.cpu")
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.gpu")
    assert cpu["deploy"]["replicas"] >= 2
    assert "reservations" not in cpu["deploy"]["resources"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # No fixed host ports on replicas: they could not be scaled.
    assert "ports" not in cpu and "ports" not in gpu


def interpolated(text: str, environ: dict[str, str]) -> str:
    """`text` with compose's ${...} variables replaced as compose would, given `environ`; an unset
    required variable (`:?`) raises ValueError."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        current = environ.get(name)
        if operator.endswith("?") and not current:
            raise ValueError(f"{name}: {argument}")
        if operator.endswith("-") and not current:
            return argument
        return current or ""

    return _VARIABLE.sub(value, text)


def env_example() -> dict[str, str]:
    lines = [
        line for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    return dict(line.split("=", 1) for line in lines)


def host_ports(service: dict[str, Any], environ: dict[str, str]) -> list[tuple[str, int]]:
    """(host address, host port) of each published port, with the variables of `environ`."""
    published = []
    for entry in service.get("ports", []):
        parts = interpolated(entry, environ).split(":")
        address = parts[0] if len(parts) == 3 else "0.0.0.0"
        published.append((address, int(parts[-2])))
    return published


def prometheus_flags() -> list[str]:
    """The compose file's Prometheus flags but its paths (tests/deploy/test_topology.py runs them)."""
    command = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]["command"]
    paths = ("--config.file=", "--storage.tsdb.path=")
    return [flag for flag in command if not flag.startswith(paths)]


def test_secrets_come_from_the_uncommitted_env_file(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    used = {m.group(1) for m in _VARIABLE.finditer(text)}
    example = env_example()
    assert used == set(example), "deploy/.env.example names exactly the variables the compose file uses"
    grafana = compose["services"]["grafana"]["environment"]
    password = grafana["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), "required, no default"
    assert example["GRAFANA_ADMIN_PASSWORD"] == "", "the template holds no password"
    with pytest.raises(ValueError, match=r"deploy/\.env"):
        interpolated(password, {})  # compose refuses to start, saying where to set it
    assert "admin/admin" not in text and "/ admin)" not in text
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=REPO, check=False)
        assert ignored.returncode == 0, "deploy/.env must be git-ignored"
        tracked = subprocess.run(["git", "ls-files", "deploy/.env"], cwd=REPO, capture_output=True, text=True)
        assert tracked.stdout == "", "deploy/.env is committed"


def test_prometheus_lifecycle_and_admin_apis_are_off(compose: dict[str, Any]) -> None:
    command = compose["services"]["prometheus"]["command"]
    for flag in UNSAFE_PROMETHEUS_FLAGS:
        assert not any(c.startswith(flag) for c in command), f"{flag}: unauthenticated"


def test_every_container_is_limited(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert {"cpus", "memory", "pids"} <= set(limits), f"{name}: limits {limits}"
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[kmg]", str(limits["memory"])), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
    # The replicas' auto settings would count the host's cores, not the limit: set to match it.
    cpu = compose["services"]["translator"]
    environment = cpu["environment"]
    assert int(environment["TRANSLATOR_INSTANCES"]) == float(cpu["deploy"]["resources"]["limits"]["cpus"])


def test_published_ports_avoid_make_run_and_keep_monitoring_local(compose: dict[str, Any]) -> None:
    services, defaults = compose["services"], env_example()
    run_ports = {ServerConfig().port, ServerConfig().metrics_port}  # `make run`'s
    for environ in ({}, defaults):  # compose's defaults, and the template's: the same ports
        published = {name: host_ports(s, environ) for name, s in services.items()}
        ports = [port for ps in published.values() for _, port in ps]
        assert not run_ports & set(ports), published
        assert len(ports) == len(set(ports))
        for name in ("prometheus", "grafana"):  # no authentication on Prometheus; Grafana's login page
            assert [address for address, _ in published[name]] == ["127.0.0.1"], name
        assert published["nginx"] == [("0.0.0.0", 50061)]


def test_compose_agrees_with_the_rendered_configuration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in REPLICA_SERVICES:
        service = services[name]
        # nginx and Prometheus find the replicas of either profile under one DNS name, on these ports.
        assert render.SERVICE_NAME in service["networks"]["default"]["aliases"]
        assert int(service["environment"]["TRANSLATOR_PORT"]) == render.GRPC_PORT
        assert int(service["environment"]["TRANSLATOR_METRICS_PORT"]) == render.METRICS_PORT
    nginx, prometheus = services["nginx"], services["prometheus"]
    assert _mount_of(nginx, render.NGINX_CONF) == "/etc/nginx/nginx.conf"
    assert any(p.endswith(f":{render.BALANCER_PORT}") for p in nginx["ports"])
    config_path = _mount_of(prometheus, render.PROMETHEUS_CONF)
    assert f"--config.file={config_path}" in prometheus["command"]
    # The rendered configuration names the rules file relative to itself: mounted next to it.
    rules_path = _mount_of(prometheus, render.RULES_FILE)
    assert Path(rules_path) == Path(config_path).parent / render.compose_prometheus().rules_file
    assert any(p.endswith(f":{render.PROMETHEUS_PORT}") for p in prometheus["ports"])


def test_grafana_provisioning(compose: dict[str, Any], dashboard: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = GRAFANA / "provisioning"
    assert _mount_of(grafana, provisioning / "datasources") == "/etc/grafana/provisioning/datasources"
    assert _mount_of(grafana, provisioning / "dashboards") == "/etc/grafana/provisioning/dashboards"

    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{render.PROMETHEUS_PORT}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "translator.yml").read_text())["providers"]
    assert provider["type"] == "file"
    assert _mount_of(grafana, DASHBOARD.parent) == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"

    # Every panel and variable queries the provisioned datasource.
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert uids == {datasource["uid"]}


def test_dashboard_panels_have_queries(dashboard: dict[str, Any]) -> None:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        for target in panel["targets"]:
            expr = target["expr"].strip()
            assert expr, f"{panel['title']!r} has an empty query"
            # Range vectors follow the scrape interval: $__rate_interval, never a fixed window.
            assert not re.search(r"\[\d+[smhd]\]", expr), f"{panel['title']!r}: fixed range in {expr}"
            assert expr.count("(") == expr.count(")"), expr
    titles = {p["title"] for p in panels}
    for wanted in (
        "Request rate by status",
        "Error ratio",
        "Request latency p50 / p95 / p99",
        "Time to first token p50 / p95 / p99",
        "Time per output token p50 / p95 / p99",
        "Queue depth",
        "Decode batch size",
        "Output tokens/s",
        "KV-cache usage",
        "Sequences in flight",
        "Request rate per replica",
    ):
        assert wanted in titles
    # The variables the topology test substitutes are the only ones.
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = {m for p in panels for t in p["targets"] for m in re.findall(r"\$(\w+)", t["expr"])}
    assert used <= variables | {"__rate_interval"}, used
