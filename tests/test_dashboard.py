"""The Grafana dashboard is proven: every panel and annotation query returns data from a real Prometheus
scraping a real gateway and worker through a switch, a rollback, a canary split and a shadow; the JSON is sane;
the metrics catalogue in the README is exactly what /metrics exposes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.loadgen import LoadGenerator
from gateway.metrics import GatewayMetrics
from gateway.records import Deployment, ServiceConfig, State
from gateway.settings import Settings
from gateway.store import EmbeddedStore
from tests.mlflow_support import Registry
from tests.support import FAILURES, ROOT, backend_app, eventually, free_port, serve_app, wait_port
from tests.test_alerting import tool
from tests.support import Load
from tests.test_guard import FAST_GUARD
from workers.metrics import WorkerMetrics

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "turnout.json").read_text())
NAMESPACE = "turnout-test"
# The panels that query (rows only group the panels below them).
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(where, expression) of every panel target and annotation."""
    out = [(f"panel {p['id']} {p['title']} / {t['refId']}", t["expr"]) for p in PANELS for t in p["targets"]]
    out += [(f"annotation {a['name']}", a["expr"]) for a in DASHBOARD["annotations"]["list"]]
    return out


def substitute(expr: str) -> str:
    """Grafana's variables as the dashboard would send them."""
    for var, value in (("$__rate_interval", "15s"), ("$__range", "5m"), ("$__interval", "5s"),
                       ("$namespace", NAMESPACE), ("$service", ".*"), ("$deployment", ".*")):
        expr = expr.replace(var, value)
    return expr


def scorer(shadow: bool = False) -> web.Application:
    """A model server answering MLflow's ``{"predictions": [{"label", "score"}]}``, a row per input row. As a
    shadow it disagrees on every third request (scores 0.03 higher) and flips the labels of every sixth."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    seen = [0]

    async def invocations(request: web.Request) -> web.Response:
        rows = (await request.json())["inputs"]
        seen[0] += 1
        off = shadow and seen[0] % 3 == 0
        flip = shadow and seen[0] % 6 == 0
        predictions = []
        for row in rows:
            score = sum(row) / 10 + (0.03 if off else 0.0)
            predictions.append({"label": int(score > 0.5) ^ flip, "score": score})
        return web.json_response({"predictions": predictions})

    app.router.add_post("/invocations", invocations)
    return app


def test_dashboard_json_is_sane() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert DASHBOARD["uid"] and DASHBOARD["schemaVersion"] >= 36
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    refs = [p["datasource"] for p in PANELS] + [t["datasource"] for p in PANELS for t in p["targets"]]
    refs += [v["datasource"] for v in DASHBOARD["templating"]["list"]] + [a["datasource"] for a in DASHBOARD["annotations"]["list"]]
    assert all(r == {"type": "prometheus", "uid": datasource["uid"]} for r in refs), "every query uses the provisioned datasource"
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"namespace", "service", "deployment"}
    for where, expr in queries():
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__range", "__interval"}
        assert used <= variables, (where, used)
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "turnout.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    for panel in PANELS:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["targets"]
    for row in DASHBOARD["panels"]:
        if row["type"] == "row":
            assert "targets" not in row and row["gridPos"]["x"] == 0 and row["gridPos"]["w"] == 24, row["title"]
    # On the 24-column grid, and no two panels (rows included) cover the same cell.
    cells: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[x, y] = panel["title"]


def exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name + ("_total" if kind == "counter" and not name.endswith("_total") else ""))
    return names


def test_metrics_catalogue_matches_exposition(tmp_path: Path) -> None:
    from gateway.siblings import ProcessSlot, Siblings, merge

    gateway = GatewayMetrics()
    worker = WorkerMetrics()
    # One process of several (turnout gateway --processes N) exposes what a single one does, and more.
    Siblings(ProcessSlot(tmp_path, 0), gateway)
    merged = merge({0: list(gateway.registry.collect())}).decode()
    exposed = exposed_names(merged) | exposed_names(worker.exposition().decode())
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(turnout_[a-z_]+)", readme, re.M))
    assert documented == exposed, {"undocumented": exposed - documented, "not exposed": documented - exposed}


@pytest.mark.slow
async def test_every_dashboard_query_returns_data(
    tmp_path: Path, gateway_factory: Any, mlflow_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.service import create_metrics_app
    from workers.supervisor import Worker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_registry.tracking_uri)
    monkeypatch.setenv("PATH", f"{Path(__import__('sys').executable).parent}:{__import__('os').environ['PATH']}")
    store = EmbeddedStore()
    blue, green = backend_app("blue"), backend_app("green")
    async with serve_app(blue) as blue_url, serve_app(green) as green_url, serve_app(scorer()) as v1_url, \
            serve_app(scorer(shadow=True)) as v2_url:
        for name, url in (("blue", blue_url), ("green", green_url), ("gone", f"http://127.0.0.1:{free_port()}")):
            await store.create_deployment(Deployment(name=name, url=url, state=State.READY, external=True))
        await store.set_route("blue", None)
        # A second service, so every panel is seen split by service. Its model servers answer as MLflow does,
        # and v2 shadows its active blue (below) and disagrees with it now and then.
        assert await store.create_service("loans", ServiceConfig())
        for name, server in (("blue", v1_url), ("v2", v2_url)):
            await store.create_deployment(Deployment(name=name, url=server, state=State.READY, external=True),
                                          service="loans")
        await store.set_route("blue", None, service="loans")
        # Two replicas, one of them dead: the gateway retries its requests on the other and ejects it
        # (for longer than the test lasts), so the Replicas row sees a retry, an ejection and a replica out.
        dead = f"http://127.0.0.1:{free_port()}"
        await store.create_deployment(Deployment(name="pair", url=blue_url, urls=(blue_url, dead), state=State.READY,
                                                 external=True))
        # Request bodies over 1 KiB are not copied to a shadow, so the Shadow row sees copies dropped.
        url = await gateway_factory(store, **FAST_GUARD, outlier_base_ejection=300.0, shadow_max_body=1024)
        async with aiohttp.ClientSession() as s, s.post(url + "/admin/services/loans/shadow", json={
            "deployment": "v2", "percent": 100,
        }) as resp:
            assert resp.status == 200, await resp.text()
        worker_port = free_port()
        worker = Worker(Settings(deployments="served=models:/iris/1", lease_ttl=5.0, health_interval=1.0), store)
        await worker.start()
        runner = web.AppRunner(create_metrics_app(worker))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", worker_port).start()
        # Loans' own traffic, on from the start to the last query so the Shadow row's rates never run dry;
        # every fourth body is over 1 KiB, answered but too large to copy to the shadow.
        small = json.dumps({"inputs": [[1, 2, 3, 4]]}).encode()
        big = json.dumps({"inputs": [[1, 2, 3, 4]] * 100}).encode()
        shadowed = LoadGenerator([url + "/models/loans"], rate=20, body=lambda n: big if n % 4 == 0 else small)
        prom_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "turnout-gateway", "static_configs": [{"targets": [url.removeprefix("http://")], "labels": {"namespace": NAMESPACE}}]},
                {"job_name": "turnout-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"], "labels": {"namespace": NAMESPACE}}]},
            ],
        }
        (tmp_path / "prom.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen([tool("prometheus"), f"--config.file={tmp_path / 'prom.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(prom_port)
            await shadowed.start()

            async def served_ready() -> bool:
                return (await store.read_snapshot()).is_ready("served")

            await eventually(served_ready, timeout=120)
            async with Load([url, url + "/models/loans"], rate=40):
                await asyncio.sleep(4)

                async def generation_on_two_steps() -> bool:
                    # The switch annotation compares 5 s subquery steps: it sees the switch only if a
                    # step before it already had the old generation.
                    query = f'count_over_time(max(turnout_route_generation{{namespace="{NAMESPACE}"}})[1m:5s])'
                    async with aiohttp.ClientSession() as s, s.get(
                        f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": query}
                    ) as resp:
                        result = (await resp.json())["data"]["result"]
                    return bool(result) and float(result[0]["value"][1]) >= 2

                await eventually(generation_on_two_steps, timeout=30, interval=0.5)
                async with aiohttp.ClientSession() as s:
                    for _ in range(5):  # an upstream error and client errors, so those panels have data
                        async with s.post(url + "/deployments/gone/invocations", json={}) as resp:
                            assert resp.status == 502
                        async with s.post(url + "/invocations?mode=status&code=400", json={}) as resp:
                            assert resp.status == 400
                    for _ in range(200):  # half land on the dead replica first; its fifth failure ejects it
                        async with s.post(url + "/deployments/pair/invocations", json={}) as resp:
                            assert resp.status == 200  # retried on the live replica
                        async with s.get(url + "/metrics") as resp:
                            if "turnout_replica_ejections_total{" in await resp.text():
                                break
                    else:
                        pytest.fail("the dead replica was never ejected")
                    async with s.post(url + "/admin/switch", json={"target": "green"}) as resp:
                        assert resp.status == 200
                green[FAILURES]["ratio"] = 0.4

                async def rolled_back() -> bool:
                    return (await store.read_snapshot()).route.active == "blue"

                await eventually(rolled_back, timeout=20)
                # A canary of the rolled-back green against blue, half the traffic each, held for the rest
                # of the test (a long step, a sample it never reaches), so the Canary row sees a split.
                async with aiohttp.ClientSession() as s, s.post(url + "/admin/canary", json={
                    "candidate": "green", "steps": [50], "step_seconds": 600, "min_requests": 1000,
                }) as resp:
                    assert resp.status == 201, await resp.text()
                await asyncio.sleep(4)

            async def empty_queries() -> list[str]:
                empty = []
                async with aiohttp.ClientSession() as s:
                    for where, expr in queries():
                        async with s.get(
                            f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": substitute(expr)}
                        ) as resp:
                            answer = await resp.json()
                        assert answer["status"] == "success", (where, answer)
                        if not answer["data"]["result"]:
                            empty.append(where)
                return empty

            # The Switches annotation compares 5 s subquery steps: at an instant less than one step
            # (plus a scrape) after the rollback it may not see the change yet, as Grafana's range
            # query would a moment later. Each query gets a few steps to answer.
            empty = await empty_queries()
            for _ in range(15):
                if not empty:
                    break
                await asyncio.sleep(1)
                empty = await empty_queries()
            assert empty == [], f"queries that returned no data: {empty}"
            # Per-service panels tell the services apart: both appear in the request rates and generation.
            for title in ("Request rate", "Route generation", "Replica request rate"):
                panel = next(p for p in DASHBOARD["panels"] if p["title"] == title)
                async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": substitute(panel["targets"][0]["expr"])}
                ) as resp:
                    services = {r["metric"]["service"] for r in (await resp.json())["data"]["result"]}
                assert services == {"default", "loans"}, (title, services)

            async def replica_values(title: str) -> dict[str, float]:
                panel = next(p for p in PANELS if p["title"] == title)
                async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": substitute(panel["targets"][0]["expr"])}
                ) as resp:
                    result = (await resp.json())["data"]["result"]
                return {r["metric"]["replica"]: float(r["value"][1]) for r in result if r["metric"]["deployment"] == "pair"}

            # The dead replica is out of rotation and its one ejection is counted, though its counter was
            # born with it (a plain increase() would read 0); the live replica stays in.
            assert await replica_values("Replica readiness") == {blue_url: 1.0, dead: 0.0}
            assert await replica_values("Replica ejections") == {dead: 1.0}

            async def canary_values(title: str, ref: str = "A") -> dict[str, float]:
                panel = next(p for p in PANELS if p["title"] == title)
                expr = next(t["expr"] for t in panel["targets"] if t["refId"] == ref)
                async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": substitute(expr)}
                ) as resp:
                    result = (await resp.json())["data"]["result"]
                return {f"{r['metric']['service']}/{r['metric']['deployment']}": float(r["value"][1]) for r in result}

            # The split is on the dashboard: green and blue half each, the other deployments of default at 0.
            weights = await canary_values("Route weight")
            assert {k: v for k, v in weights.items() if v} == {"default/blue": 50.0, "default/green": 50.0,
                                                                "loans/blue": 100.0}, weights
            assert weights["default/gone"] == weights["default/pair"] == 0.0
            # The comparison shows only the deployments taking traffic, the failing candidate above its baseline.
            failures = await canary_values("Canary: candidate vs baseline", "A")
            p99s = await canary_values("Canary: candidate vs baseline", "B")
            assert set(failures) == set(p99s) == {"default/blue", "default/green", "loans/blue"}, (failures, p99s)
            assert failures["default/green"] > 0.1 > failures["default/blue"], failures

            # The Shadow row shows loans' shadow v2 (a third of its requests and rows disagree, by 0.03), its
            # latency beside the active blue's, and the copies too large to send.
            for ref in ("A", "B"):
                agreement = await canary_values("Shadow agreement", ref)
                assert set(agreement) == {"loans/v2"} and 0.5 < agreement["loans/v2"] < 0.8, (ref, agreement)
            differ = await canary_values("Shadow disagreements", "A")
            assert set(differ) == {"loans/v2"} and differ["loans/v2"] > 0, differ
            assert set(await canary_values("Shadow disagreements", "B")) == {"loans/v2"}
            p50 = await canary_values("Shadow numeric differences p50 / p90 / p99", "A")
            p99 = await canary_values("Shadow numeric differences p50 / p90 / p99", "C")
            assert p50["loans/v2"] <= 1e-9 and 0.01 < p99["loans/v2"] <= 0.05, (p50, p99)
            for ref, side in (("A", "loans/v2"), ("B", "loans/v2"), ("C", "loans/blue"), ("D", "loans/blue")):
                latency = await canary_values("Shadow vs active latency p50 / p99", ref)
                assert list(latency) == [side] and 0 < latency[side] < 1, (ref, latency)
            panel = next(p for p in PANELS if p["title"] == "Shadow copies dropped")
            async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": substitute(panel["targets"][0]["expr"])}
            ) as resp:
                dropped = {(r["metric"]["deployment"], r["metric"]["reason"]): float(r["value"][1])
                           for r in (await resp.json())["data"]["result"]}
            assert set(dropped) == {("v2", "too_large")} and dropped["v2", "too_large"] > 0, dropped
            await shadowed.stop()
            assert shadowed.phase.failed == 0 and len(shadowed.results) > 100, shadowed.phase.failures
        finally:
            await shadowed.stop()
            prom.terminate()
            prom.wait(10)
            await runner.cleanup()
            await worker.stop()
