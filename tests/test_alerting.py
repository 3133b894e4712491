"""Shipped Prometheus rules and Alertmanager routing: checked by promtool/amtool, and proven end to end
with real Prometheus and Alertmanager processes (Debian packages) rolling back through the webhook."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.records import Deployment, State
from gateway.store import EmbeddedStore
from tests.support import backend_app, eventually, free_port, history, ROOT, serve_app, wait_port
from tests.support import Load

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "turnout.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: .ci/run installs Debian's prometheus and prometheus-alertmanager"
    return found


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    subprocess.run([tool("promtool"), "check", "rules", str(RULES)], check=True, capture_output=True)
    result = subprocess.run([tool("promtool"), "test", "rules", "turnout_test.yml"],
                            cwd=DEPLOY / "prometheus" / "tests", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_checks_the_alertmanager_config() -> None:
    result = subprocess.run([tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def alerting(tmp_path: Path) -> Iterator[Any]:
    """Start real Prometheus and Alertmanager (1 s intervals) against a gateway: ``start(gateway_url, token)``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(gateway_url: str, token: str) -> None:
        am_port, prom_port = free_port(), free_port()
        token_file = tmp_path / "token"
        token_file.write_text(token)
        am = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
        for receiver in am["receivers"]:
            for hook in receiver.get("webhook_configs", []):
                hook["url"] = gateway_url + "/admin/alerts"
                hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
        (tmp_path / "am.yml").write_text(yaml.safe_dump(am))
        prom = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "turnout-gateway",
                                "static_configs": [{"targets": [gateway_url.removeprefix("http://")]}]}],
        }
        (tmp_path / "prom.yml").write_text(yaml.safe_dump(prom))
        procs.append(subprocess.Popen([
            tool("prometheus-alertmanager"), f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([
            tool("prometheus"), f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(am_port)
        wait_port(prom_port)

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
async def test_prometheus_alert_rolls_back_through_alertmanager(alerting: Any, gateway_factory: Any) -> None:
    blue, green = backend_app("blue"), backend_app("green", fail_ratio=0.3)
    async with serve_app(blue) as blue_url, serve_app(green) as green_url:
        store = EmbeddedStore()
        for name, url in (("blue", blue_url), ("green", green_url)):
            await store.create_deployment(Deployment(name=name, url=url, state=State.READY, external=True))
        await store.set_route("blue", None)
        # The guard is off: only Prometheus → Alertmanager → webhook can roll back here.
        url = await gateway_factory(store, admin_token="am-token", guard_enabled=False)
        await store.set_route("green", "blue")
        alerting(url, "am-token")

        async def back_on_blue() -> bool:
            return (await store.read_snapshot()).route.active == "blue"

        async with Load([url], rate=30):
            await eventually(back_on_blue, timeout=120, interval=0.5)
    entries = await history(store)
    rollback = next(e for e in entries if e["action"] == "rollback" and e["result"] == "applied")
    assert rollback["trigger"] == "alertmanager" and rollback["from"] == "green"
    assert rollback["actor"] == "alertmanager:TurnoutActiveDeploymentFailing"
    assert "green fails" in rollback["reason"]


def shipped_rule(name: str) -> dict[str, Any]:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == name)


async def test_a_stalled_canary_alert_warns_and_never_touches_the_plan(gateway_factory: Any) -> None:
    """TurnoutCanaryStalled only warns: it carries no turnout_action, so Alertmanager's webhook, which
    aborts a running canary on any rollback alert naming no deployment, leaves the plan alone."""
    rule = shipped_rule("TurnoutCanaryStalled")
    assert rule["labels"] == {"severity": "warning"}, "a stalled canary is not a broken one: no rollback"
    async with serve_app(backend_app("blue")) as blue_url, serve_app(backend_app("green")) as green_url:
        store = EmbeddedStore()
        for name, url in (("blue", blue_url), ("green", green_url)):
            await store.create_deployment(Deployment(name=name, url=url, state=State.READY, external=True))
        await store.set_route("blue", None)
        url = await gateway_factory(store, admin_token="am-token")
        alert = {"version": "4", "status": "firing", "receiver": "default", "groupKey": "g", "alerts": [{
            "status": "firing", "labels": {"alertname": "TurnoutCanaryStalled", "service": "default", **rule["labels"]},
            "annotations": {"summary": "the canary in default has been on one step for 9m 30s"},
            "startsAt": "2026-12-01T00:00:00Z", "fingerprint": "stalled"}]}
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer am-token"}) as s:
            async with s.post(url + "/admin/canary", json={"candidate": "green", "steps": [50], "step_seconds": 600,
                                                          "min_requests": 1000}) as resp:
                assert resp.status == 201, await resp.text()
            async with s.post(url + "/admin/alerts", json=alert) as resp:
                answer = await resp.json()
        assert answer["results"] == [{"alert": "TurnoutCanaryStalled", "action": "ignored",
                                      "detail": "no turnout_action=rollback label"}], answer
        snapshot = await store.read_snapshot()
        assert snapshot.plan is not None and snapshot.plan.state == "running"
        assert (snapshot.route.active, snapshot.route.candidate, snapshot.route.weight) == ("blue", "green", 50.0)
