"""deploy/render.py: the committed compose configuration is what the templates give; both topologies render.

promtool checks the rules and the rendered Prometheus configuration (skipped without Debian's
prometheus package, failed under CI=true); nginx -t is run on the local rendering by
tests/deploy/test_topology.py, which also runs it.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import render
from tests.deploy.tools import require_binary


def test_committed_files_are_rendered_from_the_templates() -> None:
    for path, text in render.compose_files().items():
        assert path.read_text() == text, f"{path} is out of date: run python -m deploy.render"
    assert render.main(["--check"]) == 0


def test_fill_needs_every_field_and_uses_every_value() -> None:
    assert render.fill("a {{ x }} b {{y}}", {"x": "1", "y": "2"}) == "a 1 b 2"
    with pytest.raises(KeyError, match="without a value"):
        render.fill("{{ x }} {{ y }}", {"x": "1"})
    with pytest.raises(KeyError, match="unused"):
        render.fill("{{ x }}", {"x": "1", "z": "2"})


def test_nginx_compose_and_local() -> None:
    compose = render.render_nginx(render.compose_nginx())
    assert f"server {render.SERVICE_NAME}:{render.GRPC_PORT} resolve {render.PASSIVE_HEALTH};" in compose
    assert f"resolver {render.DOCKER_DNS} " in compose
    assert "http2 on;" in compose and f"listen {render.BALANCER_PORT};" in compose

    local = render.render_nginx(render.local_nginx(8000, [7001, 7002], Path("/tmp/x")))
    assert "server 127.0.0.1:7001 max_fails=1" in local and "server 127.0.0.1:7002 max_fails=1" in local
    servers = [line.split() for line in local.splitlines() if re.match(r"\s*server \S+ .*;$", line)]
    assert len(servers) == 2 and not any("resolve" in s for s in servers)
    assert not any(line.strip().startswith("resolver ") for line in local.splitlines())
    assert "listen 127.0.0.1:8000 http2;" in local
    assert "pid /tmp/x/nginx.pid;" in local
    for text in (compose, local):
        assert "{{" not in text and "grpc_pass grpc://translator;" in text
    with pytest.raises(ValueError):
        render.render_nginx(render.local_nginx(8000, [], Path("/tmp/x")))


def test_prometheus_compose_and_local() -> None:
    compose = yaml.safe_load(render.render_prometheus(render.compose_prometheus()))
    jobs = {job["job_name"]: job for job in compose["scrape_configs"]}
    (sd,) = jobs["translator"]["dns_sd_configs"]
    assert sd == {
        "names": [render.SERVICE_NAME],
        "type": "A",
        "port": render.METRICS_PORT,
        "refresh_interval": "5s",
    }
    assert compose["rule_files"] == ["alerts.yml"]

    local = yaml.safe_load(render.render_prometheus(render.local_prometheus(9999, [7001, 7002])))
    jobs = {job["job_name"]: job for job in local["scrape_configs"]}
    assert jobs["translator"]["static_configs"] == [{"targets": ["127.0.0.1:7001", "127.0.0.1:7002"]}]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:9999"]}]
    assert local["rule_files"] == [str(render.RULES_FILE)]
    assert local["global"]["scrape_interval"] == "1s"


def test_promtool_checks_the_rules_and_the_rendered_configuration(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    rules = subprocess.run(
        [promtool, "check", "rules", str(render.RULES_FILE)], capture_output=True, text=True, timeout=60
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The compose rendering with its rules file beside it, as mounted in the container, and the local one.
    (tmp_path / "compose").mkdir()
    (tmp_path / "compose" / "prometheus.yml").write_text(render.PROMETHEUS_CONF.read_text())
    (tmp_path / "compose" / "alerts.yml").write_text(render.RULES_FILE.read_text())
    (tmp_path / "local.yml").write_text(render.render_prometheus(render.local_prometheus(9999, [7001])))
    for config in (tmp_path / "compose" / "prometheus.yml", tmp_path / "local.yml"):
        check = subprocess.run(
            [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_nginx_accepts_the_compose_configuration(tmp_path: Path) -> None:
    """`nginx -t` on the compose rendering, its paths moved into tmp_path.

    The nginx image is >= 1.27.3; an older local nginx (Debian 12's 1.22) has neither the upstream
    `resolve` parameter nor `http2 on;`, so for it those two are spelled the old way (and the
    service name, which only Docker's DNS knows, becomes a loopback address): every other line is
    checked as the container reads it.
    """
    nginx = require_binary("nginx", "nginx")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=60).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    assert found is not None, version
    config = dataclasses.replace(
        render.compose_nginx(), runtime_dir=str(tmp_path), access_log=str(tmp_path / "access.log")
    )
    text = render.render_nginx(config)
    if tuple(int(v) for v in found.groups()) < (1, 27, 3):
        server, listen = f"{render.SERVICE_NAME}:{render.GRPC_PORT}", render.BALANCER_PORT
        old_spelling = {
            f"server {server} resolve ": f"server 127.0.0.1:{render.GRPC_PORT} ",
            f"listen {listen};\n        http2 on;": f"listen {listen} http2;",
        }
        for new, old in old_spelling.items():
            assert text.count(new) == 1, new
            text = text.replace(new, old)
    (tmp_path / "nginx.conf").write_text(text)
    argv = [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
    check = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
