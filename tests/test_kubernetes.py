"""What can be proven of the Kubernetes manifests without a cluster: every overlay renders with the command
deploy/kubernetes/README.md gives for it and validates against the Kubernetes API (strict: no unknown
field), and the wiring holds: references resolve, probes hit the gateway's and worker's real endpoints on
the configured ports, every TURNOUT_* variable is a setting of the right scope, secrets stay out of the
manifests, shutdown timing adds up, the admin port stays off the data plane, and every container is
locked down."""

from __future__ import annotations

import base64
import functools
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import create_admin_app, create_app
from gateway.records import parse_specs
from gateway.settings import BOTH, ENV_PREFIX, GATEWAY, WORKER, Settings
from tests.support import BIN, ROOT, child_env, free_port

K8S = ROOT / "deploy" / "kubernetes"
README = K8S / "README.md"
# The oldest Kubernetes still commonly run; kubernetes-validate carries its schemas (it works offline).
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The overlays that run Turnout (the others add monitoring next to one of them).
TURNOUT_OVERLAYS = ["example", "managed-redis", "sentinel"]
# Secrets an operator creates beside an overlay (README: `kubectl create secret`), never rendered.
OUT_OF_BAND = {"sentinel": {"turnout-admin"}, "managed-redis": {"turnout-admin", "turnout-redis"}, "example": set()}
# Kinds kubernetes-validate has no schema for: checked below for what they select.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}
CLIENT_VARIABLES = {"TURNOUT_URL", "TURNOUT_SERVICE"}
SETTINGS = {name for name, _default, _doc in Settings.reference()}
SCOPES = {ENV_PREFIX + name.upper(): f.metadata["scope"] for name, f in Settings.__dataclass_fields__.items()}
MONITORING_FILES = {
    "turnout-prometheus-rules": ROOT / "deploy/prometheus/rules/turnout.yml",
    "turnout-grafana-dashboard": ROOT / "deploy/grafana/dashboards/turnout.json",
}


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is missing (it renders the Kustomize overlays: `kubectl kustomize`)"
    return found


@functools.cache
def render_commands() -> dict[str, str]:
    """Overlay → the command README.md renders it with (the part before `| kubectl apply`)."""
    commands = {}
    for m in re.finditer(r"^(kubectl kustomize [^|\n]*deploy/kubernetes/overlays/([\w-]+)) \| kubectl apply -f -$",
                         README.read_text(), re.MULTILINE):
        assert m.group(2) not in commands, f"two commands for {m.group(2)}"
        commands[m.group(2)] = m.group(1)
    return commands


@functools.cache
def rendered_text(overlay: str) -> str:
    argv = shlex.split(render_commands()[overlay])
    result = subprocess.run([kubectl(), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in find(docs, kind)])
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every Deployment and StatefulSet."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d, d["spec"]["template"]


def workers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in find(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/name"] == "turnout-worker"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def environment(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """A container's literal environment: its ConfigMaps (envFrom) and its `value`s, later ones winning."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def env_sources(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e.get("valueFrom", {}) for e in c.get("env", [])}


def settings_of(docs: list[dict[str, Any]], c: dict[str, Any]) -> Settings:
    return Settings.load(env={k: v for k, v in environment(docs, c).items() if k.startswith(ENV_PREFIX)})


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return number


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def gateway(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], Settings]:
    deployment = one(docs, "Deployment", "turnout-gateway")
    c = container(deployment, "gateway")
    return deployment, c, settings_of(docs, c)


# --- rendering and the Kubernetes API ------------------------------------------------------------------


def test_every_overlay_has_its_documented_command() -> None:
    assert sorted(render_commands()) == OVERLAYS
    assert set(TURNOUT_OVERLAYS) <= set(OVERLAYS)
    # Only the overlay whose generated files live outside its directory loosens kustomize's restriction.
    loose = {o for o, cmd in render_commands().items() if "--load-restrictor LoadRestrictionsNone" in cmd}
    assert loose == {"monitoring"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_the_kubernetes_api(overlay: str) -> None:
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSION, "--quiet", "-"],
        input=rendered_text(overlay), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0 and "ERROR" not in result.stdout and "FATAL" not in result.stdout, result.stdout + result.stderr
    # Nothing is skipped but the Operator's kinds, which have no schema in Kubernetes itself.
    skipped = re.findall(r"Couldn't find schema for kind (\w+)", result.stdout)
    assert set(skipped) <= OPERATOR_KINDS, result.stdout
    assert {d["kind"] for d in rendered(overlay)} & OPERATOR_KINDS == set(skipped)


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_every_reference_resolves(overlay: str) -> None:
    """A misspelt or unhashed name would leave a pod waiting for a ConfigMap or Secret that never comes."""
    docs = rendered(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"turnout"}
    missing: set[str] = set()
    for _workload, template in pod_specs(docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            for source in c.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names, source
            for ref in env_sources(c).values():
                if "configMapKeyRef" in ref:
                    assert ("ConfigMap", ref["configMapKeyRef"]["name"]) in names, ref
                if "secretKeyRef" in ref:
                    name = ref["secretKeyRef"]["name"]
                    if ("Secret", name) in names:
                        assert ref["secretKeyRef"]["key"] in one(docs, "Secret", name)["data"], ref
                    else:
                        missing.add(name)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
    assert missing == OUT_OF_BAND[overlay]
    for secret in missing:
        assert f"kubectl -n turnout create secret generic {secret} " in README.read_text(), f"README says how to create {secret}"
    # Services, budgets and autoscalers point at pods and workloads that exist.
    pods = [template["metadata"]["labels"] for _w, template in pod_specs(docs)]
    for service in find(docs, "Service"):
        assert any(selects(service["spec"]["selector"], labels) for labels in pods), service["metadata"]["name"]
    for pdb in find(docs, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], labels) for labels in pods), pdb["metadata"]["name"]
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        one(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    # Each workload selects its own pods only (the per-model workers share a template).
    for workload, template in pod_specs(docs):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selects(selector, template["metadata"]["labels"])
        assert [w for w, t in pod_specs(docs) if selects(selector, t["metadata"]["labels"])] == [workload]


# --- the gateway ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_gateway_probes_ports_and_services_match_its_settings(overlay: str) -> None:
    docs = rendered(overlay)
    deployment, c, settings = gateway(docs)
    assert settings.host == "0.0.0.0" and settings.admin_port is not None and settings.admin_port != settings.port
    assert settings.admin_host in (None, "0.0.0.0")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": settings.port, "admin": settings.admin_port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/ping"
    for probe in ("readinessProbe", "livenessProbe"):
        assert port_number(c, c[probe]["httpGet"]["port"]) == settings.port, probe
    # Those are the data-plane listener's endpoints; the admin API is on the admin listener alone.
    app = create_app(settings)
    data_plane = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    assert {("GET", "/health"), ("GET", "/ping"), ("GET", "/metrics")} <= data_plane
    assert not any(path.startswith("/admin") for _method, path in data_plane)
    admin = {path for r in create_admin_app(app).router.routes() if r.resource is not None for path in [r.resource.canonical]}
    assert {"/admin/state", "/admin/switch", "/admin/alerts"} <= admin
    # Prometheus' annotations name the port /metrics is on.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == settings.port


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_the_data_plane_service_does_not_expose_the_admin_port(overlay: str) -> None:
    docs = rendered(overlay)
    _deployment, c, settings = gateway(docs)
    data_plane, admin = one(docs, "Service", "turnout-gateway"), one(docs, "Service", "turnout-admin")
    assert [port_number(c, p["targetPort"]) for p in data_plane["spec"]["ports"]] == [settings.port]
    assert [port_number(c, p["targetPort"]) for p in admin["spec"]["ports"]] == [settings.admin_port]
    # Inside the cluster only, and reachable before the first switch makes any gateway ready.
    assert admin["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert admin["spec"]["publishNotReadyAddresses"] is True
    # No other Service of any overlay reaches the admin port either.
    for service in find(docs, "Service"):
        if service["metadata"]["name"] != "turnout-admin" and selects(service["spec"]["selector"],
                                                                      deployment_labels(docs, "turnout-gateway")):
            assert settings.admin_port not in [port_number(c, p["targetPort"]) for p in service["spec"]["ports"]]


def deployment_labels(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]


async def test_the_probed_endpoints_answer_on_a_gateway_run_with_the_manifest_settings() -> None:
    """The settings of the gateway ConfigMap, run for real (ports moved to free ones, the embedded store):
    /ping answers 200, /health answers as readiness does (not 404), and the admin API is on the admin port only."""
    docs = rendered("sentinel")
    _deployment, _c, settings = gateway(docs)
    from gateway.server import start_gateway

    port, admin_port = free_port(), free_port()
    running = await start_gateway(settings.replace(host="127.0.0.1", port=port, admin_port=admin_port, redis_url=None,
                                                   admin_token="t", registry_sync=False))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/ping") as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                assert resp.status in (200, 503), await resp.text()
            async with session.get(f"http://127.0.0.1:{port}/admin/state") as resp:
                assert resp.status == 404
            async with session.get(f"http://127.0.0.1:{admin_port}/admin/state",
                                   headers={"Authorization": "Bearer t"}) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        await running.stop()


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_gateway_shuts_down_within_its_grace_period(overlay: str) -> None:
    docs = rendered(overlay)
    deployment, c, settings = gateway(docs)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    delay = float(command[1])
    # Long enough for endpoint removal to reach kube-proxy, short next to the drain.
    assert 5 <= delay <= 15
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_timeout
    assert grace > delay + settings.shutdown_timeout


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_gateway_scales_on_cpu_from_two_replicas(overlay: str) -> None:
    docs = rendered(overlay)
    deployment, c, _settings = gateway(docs)
    # The autoscaler owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    (hpa,) = [h for h in find(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "turnout-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert "cpu" in c["resources"]["requests"], "CPU utilisation is measured against the request"
    (pdb,) = [p for p in find(docs, "PodDisruptionBudget")
              if selects(p["spec"]["selector"]["matchLabels"], deployment_labels(docs, "turnout-gateway"))]
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_the_admin_token_comes_from_a_secret(overlay: str) -> None:
    docs = rendered(overlay)
    for _workload, template in pod_specs(docs):
        for c in template["spec"]["containers"]:
            for e in c.get("env", []):
                if e["name"] == "TURNOUT_ADMIN_TOKEN":
                    assert "value" not in e and e["valueFrom"]["secretKeyRef"]["key"] == "token", e
    _deployment, c, _settings = gateway(docs)
    assert env_sources(c)["TURNOUT_ADMIN_TOKEN"]["secretKeyRef"]["name"].startswith("turnout-admin")
    for cm in find(docs, "ConfigMap"):
        assert "TURNOUT_ADMIN_TOKEN" not in cm.get("data", {}), cm["metadata"]["name"]
    # Only the example overlay, marked as such, generates a token, and it is the placeholder.
    tokens = [s for s in find(docs, "Secret") if "token" in s.get("data", {})]
    if overlay == "example":
        (secret,) = tokens
        assert base64.b64decode(secret["data"]["token"]) == b"change-me"
        assert "EXAMPLE ONLY" in (K8S / "overlays/example/kustomization.yaml").read_text()
    else:
        assert tokens == []


# --- settings ------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.is_file() and p.name != "README.md")


def test_every_turnout_variable_named_anywhere_is_a_setting() -> None:
    named = {m for p in manifest_files() for m in re.findall(r"\bTURNOUT_[A-Z0-9_]+", p.read_text())}
    assert named and named <= SETTINGS, named - SETTINGS
    in_readme = set(re.findall(r"\bTURNOUT_[A-Z0-9_]+", README.read_text()))
    assert in_readme <= SETTINGS | CLIENT_VARIABLES, in_readme - SETTINGS - CLIENT_VARIABLES
    for overlay in OVERLAYS:
        rendered_names = set(re.findall(r"\bTURNOUT_[A-Z0-9_]+", rendered_text(overlay)))
        assert rendered_names <= SETTINGS, (overlay, rendered_names - SETTINGS)


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_each_container_gets_settings_of_its_scope_that_parse(overlay: str) -> None:
    docs = rendered(overlay)
    scopes = {"gateway": {GATEWAY, BOTH}, "worker": {WORKER, BOTH}}
    seen = set()
    for _workload, template in pod_specs(docs):
        for c in template["spec"]["containers"]:
            names = {k for k in environment(docs, c) | env_sources(c) if k.startswith(ENV_PREFIX)}
            if c["name"] not in scopes:
                assert not names, (c["name"], names)
                continue
            seen.add(c["name"])
            assert {SCOPES[n] for n in names} <= scopes[c["name"]], (c["name"], {n: SCOPES[n] for n in names})
            settings_of(docs, c)  # raises on a value the process would refuse
            # Redis comes from a Secret in every overlay (a URL may carry a password).
            assert "secretKeyRef" in env_sources(c)["TURNOUT_REDIS_URL"]
            assert environment(docs, c)["MLFLOW_TRACKING_URI"]
    assert seen == {"gateway", "worker"}


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_every_turnout_command_and_flag_exists(overlay: str) -> None:
    for workload, template in pod_specs(rendered(overlay)):
        for c in template["spec"]["containers"]:
            if c["image"].split(":")[0] != "turnout":
                continue
            args = c["args"]
            flags = [a for a in args if a.startswith("-")]
            result = subprocess.run([str(BIN / "turnout"), args[0], "--help"], env=child_env(), capture_output=True, text=True,
                                    check=False)
            assert result.returncode == 0, result.stderr
            assert all(flag in result.stdout for flag in flags), (workload["metadata"]["name"], flags)


# --- workers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_workers_advertise_their_pod_ip_and_listen_on_every_interface(overlay: str) -> None:
    docs = rendered(overlay)
    assert workers(docs), "a worker Deployment per model"
    for workload in workers(docs):
        c = container(workload, "worker")
        settings = settings_of(docs, c)
        env = environment(docs, c)
        assert env_sources(c)["TURNOUT_ADVERTISE_HOST"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert settings.model_host == "0.0.0.0"
        assert "--claim" in c["args"] or settings.claim or settings.deployments
        # The deployments it registers parse, each belongs to a service it claims, with TURNOUT_REPLICAS.
        specs = parse_specs([settings.deployments], settings.default_service)
        assert "TURNOUT_REPLICAS" in env and settings.replicas >= 1
        if settings.claimed_services():
            assert {service for service, _name in specs} <= settings.claimed_services()
        # The model cache is an emptyDir where mlflow models serve downloads models (TMPDIR).
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[env["TMPDIR"]]]
        # Probes on the worker's own endpoints, on TURNOUT_WORKER_METRICS_PORT, outside the model ports.
        assert settings.worker_metrics_port is not None
        first, last = map(int, settings.model_ports.split("-"))
        assert not first <= settings.worker_metrics_port <= last
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": settings.worker_metrics_port}
        from workers.service import create_metrics_app

        paths = {r.resource.canonical for r in create_metrics_app(None).router.routes()  # type: ignore[arg-type]
                 if r.method == "GET" and r.resource is not None}
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] in paths, probe
            assert port_number(c, c[probe]["httpGet"]["port"]) == settings.worker_metrics_port
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == settings.worker_metrics_port
        # Stopping its model servers fits in the grace period, and a rollout step outlasts a warm-up.
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.stop_timeout
        assert workload["spec"]["minReadySeconds"] >= settings.start_timeout
        assert workload["spec"]["replicas"] >= 2 and workload["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --- Redis ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["sentinel", "example"])
def test_the_sentinel_url_names_every_sentinel_of_the_statefulset(overlay: str) -> None:
    docs = rendered(overlay)
    (secret,) = [s for s in find(docs, "Secret") if s["metadata"]["name"].startswith("turnout-redis")]
    url = base64.b64decode(secret["data"]["url"]).decode()
    m = re.fullmatch(r"redis\+sentinel://([^/]+)/(\w+)/(\d+)", url)
    assert m, url
    statefulset = one(docs, "StatefulSet", "turnout-redis")
    service = one(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    sentinel = container(statefulset, "sentinel")
    port = port_number(sentinel, "sentinel")
    pods = [f"{statefulset['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
            for i in range(statefulset["spec"]["replicas"])]
    assert m.group(1).split(",") == pods
    assert statefulset["spec"]["replicas"] >= 3, "a quorum survives losing one"
    bootstrap = (K8S / "overlays/sentinel/bootstrap.sh").read_text()
    assert f"sentinel monitor {m.group(2)} " in bootstrap and "port 26379" in bootstrap and port == 26379
    assert port_number(container(statefulset, "redis"), "redis") == 6379 and "port 6379" in bootstrap
    result = subprocess.run(["sh", "-n", str(K8S / "overlays/sentinel/bootstrap.sh")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_managed_redis_overlay_holds_no_values() -> None:
    docs = rendered("managed-redis")
    assert find(docs, "Secret") == [] and find(docs, "StatefulSet") == []


# --- security ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", TURNOUT_OVERLAYS)
def test_every_container_runs_locked_down(overlay: str) -> None:
    docs = rendered(overlay)
    for workload, template in pod_specs(docs):
        name = workload["metadata"]["name"]
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec.get("initContainers", []) + spec["containers"]:
            security = c["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert security["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert security.get("runAsUser", pod_security["runAsUser"]) != 0
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            # No registry host in the repository: images are named, and an overlay's `images:` points them.
            assert "/" not in c["image"].split(":")[0], c["image"]
    for account in find(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    namespace = one(docs, "Namespace", "turnout")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_no_machine_path_or_secret_is_committed() -> None:
    for path in manifest_files() + [README]:
        text = path.read_text()
        assert not re.search(r"/(work|home|Users|root)/", text), path
        assert not re.search(r"(?i)(password|token)\s*[:=]\s*(?!change-me)[\w-]{8,}", text), path


# --- monitoring ----------------------------------------------------------------------------------------


def test_monitoring_configmaps_are_the_repository_files_themselves() -> None:
    docs = rendered("monitoring")
    assert {d["metadata"]["name"] for d in find(docs, "ConfigMap")} == set(MONITORING_FILES)
    for name, path in MONITORING_FILES.items():
        cm = one(docs, "ConfigMap", name)
        assert cm["data"] == {path.name: path.read_text()}, f"{name} differs from {path}"
    assert one(docs, "ConfigMap", "turnout-grafana-dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"
    # Generated, not copied: no file under deploy/kubernetes holds either.
    for path in K8S.rglob("*"):
        if path.is_file():
            assert path.read_text() not in {p.read_text() for p in MONITORING_FILES.values()}, path


def test_the_operator_monitors_select_what_serves_metrics() -> None:
    monitors = rendered("servicemonitor")
    for overlay in TURNOUT_OVERLAYS:
        docs = rendered(overlay)
        _deployment, c, settings = gateway(docs)
        (service_monitor,) = find(monitors, "ServiceMonitor")
        services = [s for s in find(docs, "Service")
                    if selects(service_monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in services] == ["turnout-gateway"]
        (endpoint,) = service_monitor["spec"]["endpoints"]
        (port,) = [p for p in services[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert port_number(c, port["targetPort"]) == settings.port and endpoint["path"] == "/metrics"
        (pod_monitor,) = find(monitors, "PodMonitor")
        selected = [w for w in workers(docs)
                    if selects(pod_monitor["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])]
        assert selected == workers(docs)
        (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
        for workload in selected:
            worker = container(workload, "worker")
            assert port_number(worker, endpoint["port"]) == settings_of(docs, worker).worker_metrics_port
        assert all(m["metadata"]["namespace"] == one(docs, "Deployment", "turnout-gateway")["metadata"]["namespace"]
                   for m in monitors)
