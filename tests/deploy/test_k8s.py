"""deploy/k8s: every manifest and every kustomize build, checked against the Kubernetes schemas.

Schemas: the PyPI package kubernetes-validate (bundled OpenAPI schemas, offline), strict mode (an
unknown or misspelt field is an error), for the oldest Kubernetes the manifests support (1.27:
native gRPC probes are GA there) and the newest the package knows. The ServiceMonitor is a CRD
with no bundled schema: its required fields are checked by hand. Kustomize builds run
`kustomize build` or `kubectl kustomize` (skipped, with the reason, when neither is installed).
Beyond the schemas: probes speak gRPC on the container's gRPC port, selectors match the pods, the
HPA scales the Deployment, shutdown fits in the grace period, and the custom metric exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.config import SETTINGS, ServerConfig
from service.metrics import Metrics
from tests.deploy.test_dockerfiles import dockerfile

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OLDEST = "1.27.0"  # grpc probes: GA in 1.27
VERSIONS = (OLDEST, kubernetes_validate.latest_version())
ADAPTER_VALUES = K8S / "components" / "queue-depth-hpa" / "prometheus-adapter-values.yaml"
QUEUE_METRIC = "translator_queue_depth"
KUSTOMIZATION_KINDS = {"Kustomization", "Component"}
# Overlays (and the base) that build to something; components are built through them.
BUILDS = sorted(
    p.parent.relative_to(K8S).as_posix()
    for p in K8S.rglob("kustomization.yaml")
    if yaml.safe_load(p.read_text(encoding="utf-8"))["kind"] == "Kustomization"
)
GPU_BUILDS = [b for b in BUILDS if "gpu" in b]
QUEUE_BUILDS = [b for b in BUILDS if "queue-depth" in b]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


# --- the kustomizations and the files they name ----------------------------------------------------


@cache
def kustomizations() -> dict[Path, dict[str, Any]]:
    return {p.parent: load_all(p)[0] for p in sorted(K8S.rglob("kustomization.yaml"))}


def named_files(key: str) -> list[Path]:
    """The files (not directories) that the kustomizations list under `resources` or `patches`."""
    found = []
    for directory, kustomization in kustomizations().items():
        for entry in kustomization.get(key, []):
            path = entry.get("path") if isinstance(entry, dict) else entry
            if path and (directory / path).is_file():
                found.append((directory / path).resolve())
    return sorted(set(found))


def resource_files() -> list[Path]:
    return named_files("resources")


def test_every_yaml_file_is_used() -> None:
    used = {*resource_files(), *named_files("patches"), ADAPTER_VALUES.resolve()}
    for path in K8S.rglob("*.y*ml"):
        if path.name == "kustomization.yaml":
            assert load_all(path)[0]["kind"] in KUSTOMIZATION_KINDS
            continue
        assert path.resolve() in used, f"{path.relative_to(ROOT)} is in no kustomization"


def test_kustomization_references_exist() -> None:
    for directory, kustomization in kustomizations().items():
        for key in ("resources", "components", "patches"):
            for entry in kustomization.get(key, []):
                path = entry.get("path") if isinstance(entry, dict) else entry
                if path is not None:
                    assert (directory / path).exists(), f"{directory.relative_to(ROOT)}: {key}: {path}"


# --- schema validation -----------------------------------------------------------------------------

_DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
_SERVICE_MONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints",
    "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "namespaceSelector", "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor", "podTargetLabels", "sampleLimit", "scrapeClass",
    "scrapeClassicHistograms", "scrapeProtocols", "selector", "selectorMechanism",
    "serviceDiscoveryRole", "targetLabels", "targetLimit",
}  # fmt: skip
_SERVICE_MONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}  # fmt: skip


def _seconds(duration: str) -> float:
    units = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[ywdhms])", duration))


def check_service_monitor(doc: dict[str, Any]) -> None:
    """The ServiceMonitor CRD's required fields and types (monitoring.coreos.com/v1), by hand."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    assert set(spec) <= _SERVICE_MONITOR_SPEC, f"unknown fields: {set(spec) - _SERVICE_MONITOR_SPEC}"
    assert {"selector", "endpoints"} <= set(spec), "selector and endpoints are required"
    selector = spec["selector"]
    assert isinstance(selector, dict) and set(selector) <= {"matchLabels", "matchExpressions"}
    assert all(isinstance(v, str) for v in selector.get("matchLabels", {}).values())
    endpoints = spec["endpoints"]
    assert isinstance(endpoints, list) and endpoints
    for endpoint in endpoints:
        assert set(endpoint) <= _SERVICE_MONITOR_ENDPOINT, set(endpoint) - _SERVICE_MONITOR_ENDPOINT
        assert isinstance(endpoint.get("port"), str) or "targetPort" in endpoint
        assert endpoint.get("path", "/").startswith("/")
        for key in ("interval", "scrapeTimeout"):
            assert _DURATION.match(endpoint.get(key, "0")), f"{key}: {endpoint.get(key)}"
        if "interval" in endpoint and "scrapeTimeout" in endpoint:
            assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])


CRD_CHECKS = {("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor}


def validate(doc: dict[str, Any], version: str) -> None:
    crd_check = CRD_CHECKS.get((doc["apiVersion"], doc["kind"]))
    if crd_check is not None:
        crd_check(doc)
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {where}: {err.message}")


def test_the_validator_is_strict() -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "targtPort": 1}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, OLDEST, strict=True)
    with pytest.raises(AssertionError):
        check_service_monitor(
            {"apiVersion": "monitoring.coreos.com/v1", "metadata": {"name": "x"}, "spec": {}}
        )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", resource_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_files_validate(path: Path, version: str) -> None:
    docs = load_all(path)
    assert docs, f"{path}: empty"
    for doc in docs:
        validate(doc, version)


# --- kustomize builds ------------------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@cache
def build(directory: str) -> list[dict[str, Any]]:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed: the kustomize builds are not checked")
    result = subprocess.run(
        [*command, str(K8S / directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} {directory}:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def every(docs: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] == kind)


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("directory", BUILDS)
def test_build_validates(directory: str, version: str) -> None:
    docs = build(directory)
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"):
        assert kind in kinds, f"{directory}: no {kind}"
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize("directory", BUILDS)
def test_probes_speak_grpc_health_on_the_grpc_port(directory: str) -> None:
    c = container(build(directory))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == ServerConfig().port == int(env(c).get("TRANSLATOR_PORT", ServerConfig().port))
    assert ports["metrics"] == int(env(c).get("TRANSLATOR_METRICS_PORT", ServerConfig().metrics_port))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
        assert c[probe]["grpc"].get("service", "") == "", "the whole server's status"


@pytest.mark.parametrize("directory", BUILDS)
def test_shutdown_fits_in_the_termination_grace_period(directory: str) -> None:
    docs = build(directory)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    grace = float(env(c).get("TRANSLATOR_GRACE_PERIOD_S", ServerConfig().grace_period_s))
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    sleep = 0.0
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", "preStop: a sleep (the image has no other tool)"
        sleep = float(command[1])
    elif "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    margin = 5.0  # the server's own stop after the drain, the process exit
    assert pod["terminationGracePeriodSeconds"] >= sleep + grace + margin
    live = c["livenessProbe"]
    # A draining pod is NOT_SERVING: liveness must not restart it before the drain can end.
    assert live["periodSeconds"] * live["failureThreshold"] > sleep + grace


@pytest.mark.parametrize("directory", BUILDS)
def test_selectors_match_the_pods(directory: str) -> None:
    docs = build(directory)
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(match_labels: dict[str, str]) -> bool:
        return bool(match_labels) and match_labels.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    port_names = {p["name"] for p in container(docs)["ports"]}
    services = list(every(docs, "Service"))
    assert {s["spec"].get("clusterIP") for s in services} >= {"None"}, "a headless Service"
    for service in services:
        assert selects(service["spec"]["selector"]), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port}"


@pytest.mark.parametrize("directory", BUILDS)
def test_the_hpa_scales_the_deployment(directory: str) -> None:
    docs = build(directory)
    deployment = one(docs, "Deployment")
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], "one pod may be disrupted"
    resources = container(docs)["resources"]
    metrics = hpa["spec"]["metrics"]
    cpu = [m for m in metrics if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and "cpu" in resources["requests"], "CPU utilisation is relative to the CPU request"


@pytest.mark.parametrize("directory", BUILDS)
def test_pods_run_as_the_images_non_root_user(directory: str) -> None:
    docs = build(directory)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    kind = "gpu" if "gpu" in directory else "cpu"
    user = dockerfile(kind).final.last("USER")
    assert user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.args.partition(":")[0]
    security = c["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    if security.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, "a writable /tmp next to a read-only root"
    image = c["image"]
    assert image.rsplit(":", 1)[-1] == kind, f"{directory}: {image}"


@pytest.mark.parametrize("directory", BUILDS)
def test_translator_variables_are_real_settings(directory: str) -> None:
    known = {s.env for s in SETTINGS}
    names = {n for n in env(container(build(directory))) if n.startswith("TRANSLATOR_")}
    assert names <= known, f"no such setting: {sorted(names - known)}"


@pytest.mark.parametrize("directory", BUILDS)
def test_metrics_are_scraped_once(directory: str) -> None:
    docs = build(directory)
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    monitors = list(every(docs, "ServiceMonitor"))
    by_annotation = annotations.get("prometheus.io/scrape") == "true"
    assert by_annotation != bool(monitors), "annotations or a ServiceMonitor, not both"
    if by_annotation:
        assert annotations["prometheus.io/port"] == str(ServerConfig().metrics_port)
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in every(docs, "Service") if wanted.items() <= s["metadata"]["labels"].items()]
        assert len(services) == 1, "exactly one Service: two would scrape every pod twice"
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


SCRAPER_LABELS = {"app.kubernetes.io/name": "prometheus"}  # the Prometheus Operator's and Helm's pods
CLIENT_LABELS = {"translator/access": "grpc"}  # the balancer and in-cluster clients, labelled by the user


@pytest.mark.parametrize("directory", BUILDS)
def test_the_network_policy_admits_only_the_balancer_and_the_scraper(directory: str) -> None:
    docs = build(directory)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["podSelector"]["matchLabels"], "an empty selector would be every pod of the namespace"
    assert "Ingress" in policy["policyTypes"]
    admitted: dict[str, dict[str, str]] = {}
    for rule in policy["ingress"]:
        # A rule without `from` or `ports` admits every peer or every port: none here.
        assert rule.get("from") and rule.get("ports"), rule
        (peer,) = rule["from"]
        assert "ipBlock" not in peer and peer["podSelector"]["matchLabels"], "pods chosen by label"
        for port in rule["ports"]:
            assert port["port"] in ports, f"{port['port']} is not a named container port"
            admitted[port["port"]] = peer["podSelector"]["matchLabels"]
    assert admitted == {"grpc": CLIENT_LABELS, "metrics": SCRAPER_LABELS}


@pytest.mark.parametrize("directory", BUILDS)
def test_the_metrics_port_is_on_no_client_service(directory: str) -> None:
    services = {s["metadata"]["name"]: s for s in every(build(directory), "Service")}
    exposed = {name: {p["targetPort"] for p in s["spec"]["ports"]} for name, s in services.items()}
    assert exposed == {
        "translator": {"grpc"},
        "translator-headless": {"grpc"},
        "translator-metrics": {"metrics"},
    }
    assert services["translator-metrics"]["metadata"]["labels"]["translator/metrics"] == "true"
    assert services["translator-metrics"]["spec"]["clusterIP"] == "None", "no virtual IP to call"


# --- GPU, custom metric --------------------------------------------------------------------------


@pytest.mark.parametrize("directory", GPU_BUILDS)
def test_gpu_pods_get_a_gpu_and_cuda(directory: str) -> None:
    docs = build(directory)
    c = container(docs)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert env(c)["TRANSLATOR_PROVIDER"] == "cuda"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_cpu_builds_ask_for_no_gpu() -> None:
    for directory in set(BUILDS) - set(GPU_BUILDS):
        c = container(build(directory))
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert env(c).get("TRANSLATOR_PROVIDER", "cpu") != "cuda"


def test_the_queue_depth_metric_exists_in_the_server() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    types = {family.name: family.type for family in registry.collect()}
    assert types.get(QUEUE_METRIC) == "gauge", f"service/metrics.py has no gauge {QUEUE_METRIC}"
    assert f"`{QUEUE_METRIC}`" in (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("directory", QUEUE_BUILDS)
def test_queue_depth_hpa_uses_the_adapter_rule(directory: str) -> None:
    hpa = one(build(directory), "HorizontalPodAutoscaler")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [QUEUE_METRIC]
    assert pods[0]["target"]["type"] == "AverageValue"
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))["rules"]["custom"]
    assert rule["name"]["as"] == QUEUE_METRIC
    assert re.match(rule["name"]["matches"], QUEUE_METRIC)
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    assert list(every(build(directory), "ServiceMonitor")), "the series need namespace and pod labels"
