"""What can be proven of the docker compose stack without a Docker engine: it matches the Compose
specification, every command, flag and TURNOUT_* variable it uses exists, and every port and URL it
wires matches the settings and the other services."""

from __future__ import annotations

import re
import subprocess
from dataclasses import fields
from typing import Any

import pytest
import yaml

from gateway.settings import ENV_PREFIX, Settings
from tests.support import BIN, ROOT, child_env
from tests.test_alerting import tool

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
TURNOUT_SERVICES = {name: s for name, s in SERVICES.items() if s.get("build") == "." and "entrypoint" not in s}
CLIENT_VARIABLES = {"TURNOUT_URL", "TURNOUT_ADMIN_TOKEN"}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(TURNOUT_SERVICES))
def test_every_turnout_command_and_flag_exists(name: str) -> None:
    command = TURNOUT_SERVICES[name]["command"]
    result = subprocess.run([str(BIN / "turnout"), *command, "--help"], env=child_env(), capture_output=True, text=True)
    assert result.returncode == 0, (command, result.stderr)


def test_mlflow_server_flags_exist() -> None:
    help_text = subprocess.run([str(BIN / "mlflow"), "server", "--help"], env=child_env(), capture_output=True, text=True).stdout
    flags = [arg for arg in SERVICES["mlflow"]["command"] if arg.startswith("--")]
    assert flags and all(flag in help_text for flag in flags), [f for f in flags if f not in help_text]


def test_every_turnout_variable_is_a_setting() -> None:
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)} | CLIENT_VARIABLES
    used = {k for s in SERVICES.values() for k in env_of(s) if k.startswith(ENV_PREFIX)}
    used |= {k for k in COMPOSE["x-turnout-env"] if k.startswith(ENV_PREFIX)}
    assert used and used <= known, used - known
    # And every value parses as that setting would.
    for name, service in TURNOUT_SERVICES.items():
        values = {k: v for k, v in env_of(service).items() if k.startswith(ENV_PREFIX)}
        Settings.load(env=values)


def test_ports_and_urls_are_wired_consistently() -> None:
    gateway_env = env_of(SERVICES["gateway-1"])
    port = int(gateway_env["TURNOUT_PORT"])
    for name in ("gateway-1", "gateway-2"):
        assert [p.split(":")[1] for p in SERVICES[name]["ports"]] == [str(port)]
        assert SERVICES[name]["env_file"] == ".env", "the admin token comes from the env file"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert targets["turnout-gateway"] == [f"gateway-1:{port}", f"gateway-2:{port}"]
    worker_env = env_of(SERVICES["worker"])
    assert targets["turnout-worker"] == [f"worker:{worker_env['TURNOUT_WORKER_METRICS_PORT']}"]
    assert worker_env["TURNOUT_ADVERTISE_HOST"] == "worker" and worker_env["TURNOUT_MODEL_HOST"] == "0.0.0.0"
    # Each version runs two replicas, and the port range holds them all (plus a restart's new port).
    replicas = int(worker_env["TURNOUT_REPLICAS"])
    first, last = map(int, worker_env["TURNOUT_MODEL_PORTS"].split("-"))
    hosted = len([a for a in TURNOUT_SERVICES["worker"]["command"] if a.startswith(("blue=", "green="))])
    assert replicas == 2 and last - first + 1 > hosted * replicas
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    alertmanager = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    hooks = [h for r in alertmanager["receivers"] for h in r.get("webhook_configs", [])]
    assert [h["url"] for h in hooks] == [f"http://gateway-1:{port}/admin/alerts"]
    token_file = hooks[0]["http_config"]["authorization"]["credentials_file"]
    assert token_file in " ".join(SERVICES["alertmanager"]["entrypoint"])
    mlflow_port = SERVICES["mlflow"]["command"][SERVICES["mlflow"]["command"].index("--port") + 1]
    assert COMPOSE["x-turnout-env"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    assert f"mlflow:{mlflow_port}" in SERVICES["mlflow"]["command"][SERVICES["mlflow"]["command"].index("--allowed-hosts") + 1]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert COMPOSE["x-turnout-env"]["TURNOUT_REDIS_URL"].startswith("redis://redis:6379/")
    first, last = map(int, worker_env["TURNOUT_MODEL_PORTS"].split("-"))
    assert not first <= int(worker_env["TURNOUT_WORKER_METRICS_PORT"]) <= last


def test_no_secret_in_the_compose_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "TURNOUT_ADMIN_TOKEN:" not in text and "TURNOUT_ADMIN_TOKEN=" not in text
    assert "TURNOUT_ADMIN_TOKEN=" in (ROOT / ".env.example").read_text()


def test_services_come_up_in_order() -> None:
    for name, service in SERVICES.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, (name, dependency)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], (name, dependency)


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run([tool("promtool"), "check", "config", "--syntax-only", str(ROOT / "deploy/prometheus/prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if m := re.match(r"COPY (.+) \S+$", line):
            for source in m.group(1).split():
                assert (ROOT / source).exists(), source
