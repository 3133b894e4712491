"""Shadow traffic: the comparison of two answers in every MLflow form, and copies through real gateways
on both request paths — to real ``mlflow models serve`` versions, to stand-ins that disagree, answer
errors, or freeze — never costing a client anything."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import PROXY
from gateway.records import Deployment, State
from gateway.shadow import AGREE, DIFFER, INCOMPARABLE, PRIMARY_ERROR, SHADOW_ERROR, compare, percentiles, rows_of
from gateway.store import EmbeddedStore
from tests.support import eventually, history, serve_app

TOKEN = "shadow-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["fast", "aiohttp"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return request.param == "fast"


# --- the comparison as a unit ----------------------------------------------------------------------
def test_every_mlflow_answer_form_gives_rows() -> None:
    assert rows_of({"predictions": [0, 1]}) == [0, 1]
    assert rows_of([0.5, 1.5]) == [0.5, 1.5]
    assert rows_of({"predictions": {"a": [1, 2], "b": ["x", "y"]}}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert rows_of({"predictions": [{"a": 1}, {"a": 2}]}) == [{"a": 1}, {"a": 2}]
    assert rows_of({"predictions": {"a": [1, 2], "b": [1]}}) is None
    assert rows_of({"error_code": "X"}) is None


def j(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_labels_flip_numbers_differ_within_tolerance_and_misfits_are_incomparable() -> None:
    c = compare(200, j({"predictions": [0, 1, 2, 1]}), 200, j({"predictions": [0, 2, 2, 0]}), 1e-6)
    assert (c.result, c.rows_agree, c.rows_differ) == (DIFFER, 2, 2)
    assert c.flips == Counter({"1 → 2": 1, "1 → 0": 1})
    c = compare(200, j([1.0, 2.0]), 200, j({"predictions": [1.0 + 1e-9, 2.5]}), 1e-6)
    assert (c.result, c.rows_agree, c.rows_differ) == (DIFFER, 1, 1) and c.abs_differences == pytest.approx([1e-9, 0.5])
    assert compare(200, j({"predictions": {"p": [0.1, 0.2]}}), 200, j({"predictions": [{"p": 0.1}, {"p": 0.2}]}), 0).result == AGREE
    assert compare(200, j([1, 2]), 200, j([1]), 1e-6).result == INCOMPARABLE
    assert compare(200, b"a,b\n1,2", 200, j([1]), 1e-6).result == INCOMPARABLE
    assert compare(200, j([[1, 2]]), 200, j([[1, 2, 3]]), 1e-6).result == INCOMPARABLE
    assert compare(400, j({"error_code": "x"}), 200, j([1]), 1e-6).result == PRIMARY_ERROR
    assert compare(200, j([1]), 400, j({"error_code": "x"}), 1e-6).result == SHADOW_ERROR
    assert compare(200, j([1]), None, None, 1e-6).result == SHADOW_ERROR
    # Non-finite numbers agree only with themselves, and leave no difference behind (no NaN in a percentile).
    assert compare(200, b'[NaN]', 200, b'[NaN]', 1e-6).result == AGREE
    assert compare(200, b'[Infinity]', 200, b'[-Infinity]', 1e-6).result == DIFFER
    assert compare(200, b'[Infinity]', 200, b'[1e308]', 1e-6).result == DIFFER
    c = compare(200, b'[Infinity, 1.0]', 200, b'[Infinity, NaN]', 1e-6)
    assert (c.result, c.abs_differences) == (DIFFER, [])
    assert compare(200, j([True]), 200, j([1.0]), 1e-6).flips == Counter()
    # What the gateway would spend too long on is not compared: over 64 KiB, or more than 5,000 rows.
    assert compare(200, j([1.5] * 20_000), 200, j([1.5] * 20_000), 1e-6).result == INCOMPARABLE
    assert compare(200, j([1] * 6000), 200, j([1] * 6000), 1e-6).result == INCOMPARABLE


def test_percentiles_are_numpys_linear_ones() -> None:
    import numpy as np

    values = [random.Random(5).random() for _ in range(1001)]
    got = percentiles(values)
    assert got is not None
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert got["max"] == max(values) and percentiles([]) is None


# --- through the gateway, with stand-ins ---------------------------------------------------------------
def stand_in(answer: Any = None, *, status: int = 200, freeze: asyncio.Event | None = None) -> web.Application:
    """A model server that answers ``answer(rows)`` (the rows of a dataframe_split / inputs / CSV body)."""

    async def invocations(request: web.Request) -> web.Response:
        body = await request.read()
        if freeze is not None:
            await freeze.wait()
        if status != 200:
            return web.json_response({"error_code": "BAD_REQUEST", "message": "no"}, status=status)
        if request.content_type == "text/csv":
            rows = [line.split(",") for line in body.decode().splitlines()[1:]]
        else:
            data = json.loads(body)
            rows = data.get("inputs") or data.get("dataframe_split", {}).get("data", [])
        return web.json_response({"predictions": [answer(row) for row in rows]})

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/invocations", invocations)
    return app


async def deployments(store: EmbeddedStore, **urls: str) -> None:
    for name, url in urls.items():
        assert await store.create_deployment(Deployment(name=name, url=url, state=State.READY, external=True))
    assert (await store.set_route("blue", None)).ok


async def shadow_on(s: aiohttp.ClientSession, url: str, name: str, percent: float) -> tuple[int, Any]:
    async with s.post(url + "/admin/shadow", json={"deployment": name, "percent": percent}) as resp:
        return resp.status, await resp.json()


async def report(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/admin/shadow") as resp:
        return (await resp.json())["shadow"]["report"] or {}


async def predict(s: aiohttp.ClientSession, url: str, rows: list[list[float]]) -> int:
    async with s.post(url + "/invocations", json={"inputs": rows}) as resp:
        await resp.read()
        return resp.status


async def test_classes_flips_and_numbers_compared_on_both_paths(gateway_factory: Any, fast_path: bool) -> None:
    # blue says class 1 for x > 5, green from x > 6: rows with 5 < x <= 6 flip 1 → 0.
    blue_app, green_app = stand_in(lambda r: int(r[0] > 5)), stand_in(lambda r: int(r[0] > 6))
    async with serve_app(blue_app) as blue, serve_app(green_app) as green:
        store = EmbeddedStore()
        await deployments(store, blue=blue, green=green)
        url = await gateway_factory(store, fast_path=fast_path, admin_token=TOKEN)
        rng = random.Random(11)
        batches = [[[round(rng.uniform(0, 10), 2)] for _ in range(rng.randint(1, 5))] for _ in range(200)]
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await shadow_on(s, url, "green", 100))[0] == 200
            statuses = [await predict(s, url, rows) for rows in batches]
            await eventually(lambda: report(s, url), timeout=5)
            await eventually(lambda: _mirrored(s, url, 200), timeout=10)
            got = await report(s, url)
        assert statuses == [200] * 200
        rows = [r[0] for batch in batches for r in batch]
        flips = sum(5 < x <= 6 for x in rows)
        differing = sum(any(5 < r[0] <= 6 for r in batch) for batch in batches)
        assert got["results"] == {k: v for k, v in {"agree": 200 - differing, "differ": differing}.items() if v}
        assert got["agreement"]["rows_compared"] == len(rows) and got["agreement"]["rows_differ"] == flips
        assert got["flips"] == ([{"from_to": "1 → 0", "rows": flips, "share_of_rows": flips / len(rows)}] if flips else [])
        assert got["latency_seconds"]["active"] and got["latency_seconds"]["shadow"]


async def _mirrored(s: aiohttp.ClientSession, url: str, count: int) -> bool:
    return (await report(s, url)).get("mirrored", 0) >= count


async def test_regression_differences_match_an_offline_computation(gateway_factory: Any) -> None:
    # Two "regressors" whose outputs differ by a known amount per row.
    blue_app, green_app = stand_in(lambda r: r[0] * 2.0), stand_in(lambda r: r[0] * 2.0 + r[0] ** 2 / 100)
    async with serve_app(blue_app) as blue, serve_app(green_app) as green:
        store = EmbeddedStore()
        await deployments(store, blue=blue, green=green)
        url = await gateway_factory(store, admin_token=TOKEN)
        xs = [round(random.Random(3).uniform(0, 10) + i / 7, 3) for i in range(300)]
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await shadow_on(s, url, "green", 100))[0] == 200
            for x in xs:
                assert await predict(s, url, [[x]]) == 200
            await eventually(lambda: _mirrored(s, url, len(xs)), timeout=10)
            got = (await report(s, url))["numeric"]
        offline = percentiles([abs(x * 2.0 - (x * 2.0 + x ** 2 / 100)) for x in xs])
        assert got["values_compared"] == len(xs)
        assert offline is not None
        for key, value in offline.items():
            assert got["abs_difference"][key] == pytest.approx(value, rel=1e-9), key


async def test_zero_and_all_errors_csv_and_bodies_over_the_limit(gateway_factory: Any, fast_path: bool) -> None:
    async with serve_app(stand_in(lambda r: 1)) as blue, serve_app(stand_in(status=400)) as rejecting, \
            serve_app(stand_in(lambda r: 1)) as green:
        store = EmbeddedStore()
        await deployments(store, blue=blue, green=green, rejecting=rejecting)
        url = await gateway_factory(store, fast_path=fast_path, admin_token=TOKEN, shadow_max_body=2000)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await shadow_on(s, url, "green", 0))[0] == 200
            for _ in range(50):
                assert await predict(s, url, [[1.0]]) == 200
            await asyncio.sleep(0.2)
            assert (await report(s, url)).get("mirrored", 0) == 0, "0 % copies nothing"
            # CSV is copied too (the answers are JSON and compared as such).
            assert (await shadow_on(s, url, "green", 100))[0] == 200
            async with s.post(url + "/invocations", data=b"x\n1\n2\n", headers={"Content-Type": "text/csv"}) as resp:
                assert resp.status == 200
            await eventually(lambda: _mirrored(s, url, 1), timeout=5)
            got = await report(s, url)
            assert got["results"] == {"agree": 1} and got["agreement"]["rows_compared"] == 2, got
            # Over the mirror limit: answered, not copied, counted.
            big = [[1.0]] * 400
            assert await predict(s, url, big) == 200
            assert (await report(s, url))["dropped"] == {"too_large": 1}
            # A shadow that rejects what the active answers: shadow_error, and the client never knows.
            assert (await shadow_on(s, url, "rejecting", 100))[0] == 200
            for _ in range(20):
                assert await predict(s, url, [[1.0]]) == 200
            await eventually(lambda: _mirrored(s, url, 20), timeout=5)
            got = await report(s, url)
            assert got["results"] == {"shadow_error": 20} and got["error_rates"]["shadow"] == 1.0
            assert got["examples"][-1]["shadow_status"] == 400 and got["examples"][-1]["request"].startswith('{"inputs"')
            async with s.get(url + "/metrics") as resp:
                exposition = await resp.text()
        assert 'turnout_shadow_dropped_total{deployment="green",reason="too_large",service="default"} 1.0' in exposition
        assert 'turnout_shadow_requests_total{deployment="rejecting",result="shadow_error",service="default"} 20.0' in exposition


async def test_a_frozen_shadow_costs_clients_nothing_and_drops_are_counted(gateway_factory: Any, fast_path: bool) -> None:
    freeze = asyncio.Event()
    async with serve_app(stand_in(lambda r: 1)) as blue, serve_app(stand_in(lambda r: 1, freeze=freeze)) as frozen:
        store = EmbeddedStore()
        await deployments(store, blue=blue, frozen=frozen)
        url = await gateway_factory(store, fast_path=fast_path, admin_token=TOKEN, shadow_queue=16,
                                    shadow_concurrency=2, shadow_timeout=30)
        gateway = gateway_factory.gateways[-1]
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await shadow_on(s, url, "frozen", 100))[0] == 200
            statuses = Counter()
            for _ in range(300):
                statuses[await predict(s, url, [[1.0]])] += 1
                assert gateway.app[PROXY].shadows.queued() <= 16, "the queue is bounded"
            got = await report(s, url)
            freeze.set()
        assert statuses == {200: 300}
        # Two copies are stuck at the shadow, sixteen wait; the rest were dropped, each counted.
        assert got["dropped"]["queue_full"] >= 300 - 2 - 16 - 2, got["dropped"]


async def test_turning_the_shadow_on_and_off_under_load_costs_no_request(gateway_factory: Any, fast_path: bool) -> None:
    async with serve_app(stand_in(lambda r: 1)) as blue, serve_app(stand_in(lambda r: 2)) as green:
        store = EmbeddedStore()
        await deployments(store, blue=blue, green=green)
        url = await gateway_factory(store, fast_path=fast_path, admin_token=TOKEN, poll_interval=0.2)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            stop = asyncio.Event()
            statuses: Counter[int] = Counter()

            async def load() -> None:
                while not stop.is_set():
                    statuses[await predict(s, url, [[1.0]])] += 1

            tasks = [asyncio.create_task(load()) for _ in range(4)]
            for _ in range(5):
                assert (await shadow_on(s, url, "green", 50))[0] == 200
                await asyncio.sleep(0.1)
                async with s.delete(url + "/admin/shadow") as resp:
                    assert resp.status == 200
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*tasks)
        assert set(statuses) == {200} and statuses[200] > 100
        actions = [e["action"] for e in await history(store)]
        assert actions.count("shadow_on") == 5 and actions.count("shadow_off") == 5


async def test_bad_shadow_requests_are_refused(gateway_factory: Any) -> None:
    async with serve_app(stand_in(lambda r: 1)) as blue, serve_app(stand_in(lambda r: 1)) as green:
        store = EmbeddedStore()
        await deployments(store, blue=blue, green=green)
        await store.create_deployment(Deployment(name="cold", model_uri="models:/m/1"))
        url = await gateway_factory(store, admin_token=TOKEN)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for body, status, words in [
                ({"deployment": "green", "percent": 101}, 400, "percent"),
                ({"deployment": "green", "percent": -1}, 400, "percent"),
                ({"deployment": "green", "percent": "20"}, 400, "percent"),
                ({"deployment": "green"}, 400, "percent"),
                ({"deployment": "nope", "percent": 20}, 404, "no deployment named 'nope'"),
                ({"deployment": "blue", "percent": 20}, 409, "it is the active deployment"),
                ({"deployment": "cold", "percent": 20}, 409, "cannot shadow cold: it is starting"),
            ]:
                async with s.post(url + "/admin/shadow", json=body) as resp:
                    answer = await resp.json()
                    assert resp.status == status and words in answer["message"], (body, answer)
            async with s.delete(url + "/admin/shadow") as resp:
                assert resp.status == 409 and "has no shadow" in (await resp.json())["message"]
            assert (await store.get_route()).shadow is None
            assert (await shadow_on(s, url, "green", 20))[0] == 200
            async with s.delete(url + "/admin/deployments/green") as resp:
                assert resp.status == 409 and "stop shadowing first" in (await resp.json())["message"]
            async with s.get(url + "/admin/state") as resp:
                assert (await resp.json())["shadow"]["deployment"] == "green"


@pytest.mark.slow
async def test_real_versions_agreement_equals_the_offline_one(mlflow_registry: Any, gateway_factory: Any) -> None:
    """v1 (logistic regression) and v2 (decision tree) of the test registry, served by real ``mlflow models
    serve``: the agreement the gateway reports is the one computed by asking both directly."""
    from sklearn.datasets import load_iris

    from tests.mlflow_support import model_server

    iris = load_iris().data
    rng = random.Random(17)
    # The training rows, and as many drawn across the feature ranges: where the two models draw their
    # class boundaries differently.
    data = iris.tolist() + [[round(rng.uniform(lo, hi), 1) for lo, hi in zip(iris.min(axis=0), iris.max(axis=0))]
                            for _ in range(150)]
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    with model_server(mlflow_registry, "models:/iris/1") as v1, model_server(mlflow_registry, "models:/iris/2") as v2:
        async with aiohttp.ClientSession() as s:
            offline = {}
            for name, server in (("v1", v1), ("v2", v2)):
                async with s.post(server + "/invocations", json={"dataframe_split": {"columns": columns, "data": data}}) as resp:
                    offline[name] = (await resp.json())["predictions"]
        flips = Counter(f"{a} → {b}" for a, b in zip(offline["v1"], offline["v2"]) if a != b)
        assert flips, "the two versions must disagree somewhere for this test to mean anything"
        store = EmbeddedStore()
        for name, server in (("v1", v1), ("v2", v2)):
            await store.create_deployment(Deployment(name=name, url=server, state=State.READY, external=True))
        await store.set_route("v1", None)
        url = await gateway_factory(store, admin_token=TOKEN)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await shadow_on(s, url, "v2", 100))[0] == 200
            for row in data:
                async with s.post(url + "/invocations", json={"dataframe_split": {"columns": columns, "data": [row]}}) as resp:
                    assert resp.status == 200
            await eventually(lambda: _mirrored(s, url, len(data)), timeout=30)
            got = await report(s, url)
    assert got["agreement"]["rows_compared"] == len(data)
    assert got["agreement"]["rows_differ"] == sum(flips.values())
    assert {f["from_to"]: f["rows"] for f in got["flips"]} == dict(flips.most_common(10))


async def test_a_dead_or_broken_off_shadow_is_an_error_and_a_dead_one_is_paused(gateway_factory: Any) -> None:
    from gateway.local import free_port

    async def dribble(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await response.write(b"[")
        await asyncio.sleep(10)
        return response

    slow = web.Application()
    slow.router.add_post("/invocations", dribble)
    async with serve_app(stand_in(lambda r: 1)) as blue, serve_app(slow) as broken:
        store = EmbeddedStore()
        dead = f"http://127.0.0.1:{free_port()}"
        await deployments(store, blue=blue, dead=dead, broken=broken)
        url = await gateway_factory(store, admin_token=TOKEN, shadow_timeout=0.5)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            # A shadow that answers its head and then stalls past the deadline: shadow_error, not incomparable.
            assert (await shadow_on(s, url, "broken", 100))[0] == 200
            assert await predict(s, url, [[1.0]]) == 200
            await eventually(lambda: _mirrored(s, url, 1), timeout=5)
            assert (await report(s, url))["results"] == {"shadow_error": 1}
            # A dead shadow refuses the first copy; the next ones are dropped for a while, not each tried.
            assert (await shadow_on(s, url, "dead", 100))[0] == 200
            assert await predict(s, url, [[1.0]]) == 200
            await eventually(lambda: _mirrored(s, url, 1), timeout=5)
            for _ in range(50):
                assert await predict(s, url, [[1.0]]) == 200
            got = await report(s, url)
        assert got["results"] == {"shadow_error": 1} and got["dropped"] == {"shadow_down": 50}, got


async def test_a_killed_copier_is_counted_and_replaced_and_clients_see_nothing(gateway_factory: Any, fast_path: bool) -> None:
    import os
    import signal

    freeze = asyncio.Event()
    async with serve_app(stand_in(lambda r: 1)) as blue, serve_app(stand_in(lambda r: 1, freeze=freeze)) as green:
        store = EmbeddedStore()
        await deployments(store, blue=blue, green=green)
        url = await gateway_factory(store, fast_path=fast_path, admin_token=TOKEN, shadow_timeout=30)
        shadows = gateway_factory.gateways[-1].app[PROXY].shadows
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await shadow_on(s, url, "green", 100))[0] == 200
            # Five copies held by the copier (stuck at the frozen shadow) when it is killed.
            for _ in range(5):
                assert await predict(s, url, [[1.0]]) == 200
            await eventually(lambda: shadows.queued() == 5, timeout=5)
            first = shadows._proc.pid
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: shadows._proc is None, timeout=5)
            # While it restarts, copies are dropped before anything is built; clients never notice.
            statuses = Counter([await predict(s, url, [[1.0]]) for _ in range(20)])
            freeze.set()
            assert statuses == {200: 20}
            await eventually(lambda: shadows._proc is not None and shadows._proc.pid != first, timeout=10)
            assert await shadows.ready()
            assert await predict(s, url, [[1.0]]) == 200

            async def accounted() -> bool:
                got = await report(s, url)
                return got.get("mirrored", 0) + got["dropped"].get("copier_down", 0) == 5 + 20 + 1

            await eventually(accounted, timeout=10)
            got = await report(s, url)
        # Every copy is either compared (by the new copier) or counted lost: the five the old one held at least.
        assert set(got["results"]) == {"agree"} and got["results"]["agree"] >= 1, got
        assert got["dropped"]["copier_down"] >= 5 and set(got["dropped"]) == {"copier_down"}, got
