"""The gateway in front of a real ``mlflow models serve``: every payload form passes byte for byte."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, State
from gateway.store import EmbeddedStore
from tests.mlflow_support import Registry, model_server
from tests.support import RawConnection, eventually, exchange, post

pytestmark = pytest.mark.slow

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _parquet() -> bytes:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(ROWS, columns=COLUMNS).to_parquet(buf)
    return buf.getvalue()


PAYLOADS: list[tuple[str, str, bytes]] = [
    ("dataframe_split", "application/json", json.dumps({"dataframe_split": {"columns": COLUMNS, "data": ROWS}}).encode()),
    ("dataframe_records", "application/json", json.dumps({"dataframe_records": [dict(zip(COLUMNS, r)) for r in ROWS]}).encode()),
    ("instances", "application/json", json.dumps({"instances": [dict(zip(COLUMNS, r)) for r in ROWS]}).encode()),
    ("inputs", "application/json", json.dumps({"inputs": {c: [r[i] for r in ROWS] for i, c in enumerate(COLUMNS)}}).encode()),
    ("csv", "text/csv", (",".join(COLUMNS) + "\n" + "\n".join(",".join(map(str, r)) for r in ROWS)).encode()),
    ("parquet", "application/vnd.apache.parquet", b"parquet"),
    ("malformed-json", "application/json", b'{"dataframe_split": '),
    ("wrong-columns", "application/json", json.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}).encode()),
    ("wrong-content-type", "text/plain", b"hello"),
]


@pytest.fixture(scope="module")
def served(mlflow_registry: Registry) -> Iterator[str]:
    with model_server(mlflow_registry, f"models:/{mlflow_registry.model_name}/1") as url:
        yield url


@pytest.fixture(params=["fast", "aiohttp"])
async def through_gateway(served: str, gateway_factory: Any, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A gateway in front of the real model server, on each request path."""
    store = EmbeddedStore()
    await store.create_deployment(Deployment(name="blue", url=served, state=State.READY, external=True))
    await store.set_route("blue", None)
    url = await gateway_factory(store, fast_path=request.param == "fast")

    async def ready() -> bool:
        async with aiohttp.ClientSession() as s, s.get(url + "/health") as resp:
            return resp.status == 200

    await eventually(ready, timeout=5)
    yield url


@pytest.mark.parametrize(("form", "content_type", "body"), PAYLOADS, ids=[p[0] for p in PAYLOADS])
async def test_same_status_and_bytes_as_direct(
    served: str, through_gateway: str, form: str, content_type: str, body: bytes
) -> None:
    if form == "parquet":
        body = _parquet()
    async with aiohttp.ClientSession() as s:
        async with s.post(served + "/invocations", data=body, headers={"Content-Type": content_type}) as resp:
            direct = (resp.status, await resp.read(), resp.headers.get("Content-Type"))
        async with s.post(through_gateway + "/invocations", data=body, headers={"Content-Type": content_type}) as resp:
            proxied = (resp.status, await resp.read(), resp.headers.get("Content-Type"))
            assert resp.headers["X-Turnout-Deployment"] == "blue"
    if form in ("malformed-json", "wrong-columns"):
        assert direct[0] == 400
    elif form == "wrong-content-type":
        assert direct[0] == 415
    else:
        assert direct[0] == 200 and json.loads(direct[1])["predictions"]
    assert proxied == direct


async def test_expect_100_continue_with_a_large_body_as_curl_sends_it(through_gateway: str) -> None:
    """curl sends Expect: 100-continue by itself for bodies over 1 MiB; uvicorn answers 100 when the model
    server starts reading. The client gets one 100 (the gateway's) and its own predictions, and so does
    the next client on the same pooled connection."""
    body = json.dumps({"dataframe_split": {"columns": COLUMNS, "data": ROWS * 40_000}}).encode()
    assert len(body) > 1024 * 1024
    for _ in range(3):
        conn = await RawConnection.open(through_gateway)
        head = (f"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
        conn.send(head)
        (interim,) = await conn.responses(1)
        assert interim[0] == 100
        conn.send(body)
        final = (await conn.responses(2, timeout=60))[1]
        conn.close()
        assert final[0] == 200 and len(json.loads(final[2])["predictions"]) == 80_000
        small = post("/invocations", json.dumps({"dataframe_split": {"columns": COLUMNS, "data": ROWS}}).encode())
        (after,) = await exchange(through_gateway, small, 1)
        assert after[0] == 200 and len(json.loads(after[2])["predictions"]) == 2, after


@pytest.mark.parametrize("path", ["fast", "aiohttp"])
async def test_a_streamed_request_right_after_another_clients_mlflow_500_succeeds(
    mlflow_registry: Registry, gateway_factory: Any, path: str
) -> None:
    """MLflow (uvicorn) answers an unhandled exception (here deeply nested JSON) with a 500 and then
    closes the connection without saying so: the next request, streamed, must not be sent on it.
    Its own server: MLflow 3.17 stops answering after about ten 500s."""
    deep = b"[" * 100_000 + b"]" * 100_000
    crash = post("/invocations", deep)
    payload = json.dumps({"dataframe_split": {"columns": COLUMNS, "data": ROWS}}).encode()
    chunked = (b"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(payload), payload))
    with model_server(mlflow_registry, f"models:/{mlflow_registry.model_name}/1") as served:
        store = EmbeddedStore()
        await store.create_deployment(Deployment(name="blue", url=served, state=State.READY, external=True))
        await store.set_route("blue", None)
        url = await gateway_factory(store, fast_path=path == "fast")
        await eventually(lambda: _healthy(url), timeout=5)
        for _ in range(4):
            (crashed,) = await exchange(url, crash, 1)
            assert crashed[0] == 500
            (got,) = await exchange(url, chunked, 1)
            assert got[0] == 200 and len(json.loads(got[2])["predictions"]) == 2, got


async def test_predictions_without_content_type_never_reach_mlflow(served: str, through_gateway: str) -> None:
    """Without a Content-Type MLflow answers 500, and after about ten of them nothing at all: the
    gateway answers 415 itself, and the model server stays well."""
    untyped = b"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"
    for _ in range(20):
        (refused,) = await exchange(through_gateway, untyped, 1)
        assert refused[0] == 415
    (direct,) = await exchange(served, post("/invocations", json.dumps({"inputs": {c: [1.0] for c in COLUMNS}}).encode()), 1)
    assert direct[0] == 200


async def _healthy(url: str) -> bool:
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as resp:
        return resp.status == 200


async def _green_just_switched_to(served: str, gateway_factory: Any) -> tuple[EmbeddedStore, str]:
    """A gateway whose route just moved blue → green (both the real model server): the guard is armed."""
    store = EmbeddedStore()
    for name in ("blue", "green"):
        await store.create_deployment(Deployment(name=name, url=served, state=State.READY, external=True))
    await store.set_route("blue", None)
    await store.set_route("green", "blue")
    url = await gateway_factory(store, guard_window=5.0, guard_interval=0.2, stats_flush_interval=0.1)
    return store, url


async def test_schema_violation_flood_never_rolls_back(served: str, gateway_factory: Any) -> None:
    """Clients sending schema-violating requests to a real model server (MLflow's 400
    INVALID_PARAMETER_VALUE) are counted as client errors: the guard never blames the model."""
    store, url = await _green_just_switched_to(served, gateway_factory)
    wrong = json.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}).encode()
    codes = []
    async with aiohttp.ClientSession() as s:
        for _ in range(150):
            async with s.post(url + "/invocations", data=wrong, headers={"Content-Type": "application/json"}) as resp:
                codes.append((resp.status, (await resp.json()).get("error_code")))
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)
        async with s.get(url + "/metrics") as resp:
            metrics = await resp.text()
    assert set(codes) == {(400, "INVALID_PARAMETER_VALUE")}
    assert (await store.read_snapshot()).route.active == "green", "never rolled back"
    assert 'turnout_requests_total{code="400",deployment="green",outcome="client_error",service="default"} 150.0' in metrics


async def test_a_client_flooding_bad_csv_never_rolls_back_a_good_model(served: str, gateway_factory: Any) -> None:
    """MLflow answers a CSV it cannot parse with a 400 that carries a stack trace; one such request in
    ten during the bake period is the client's doing, and must never roll a good version back."""
    store, url = await _green_just_switched_to(served, gateway_factory)
    good = (",".join(COLUMNS) + "\n" + "\n".join(",".join(map(str, r)) for r in ROWS)).encode()
    bad = (",".join(COLUMNS) + "\n5.1,3.5,not-a-number,0.2\n").encode()
    statuses = []
    async with aiohttp.ClientSession() as s:
        for n in range(200):
            body = bad if n % 10 == 0 else good
            async with s.post(url + "/invocations", data=body, headers={"Content-Type": "text/csv"}) as resp:
                statuses.append(resp.status)
                answer = await resp.read()
            if n == 0:
                assert b"stack_trace" in answer, "MLflow sends a stack trace with this client error"
        await asyncio.sleep(1.0)
        async with s.get(url + "/metrics") as resp:
            metrics = await resp.text()
    assert statuses.count(400) == 20 and statuses.count(200) == 180
    assert (await store.read_snapshot()).route.active == "green", "never rolled back"
    assert 'turnout_requests_total{code="400",deployment="green",outcome="client_error",service="default"} 20.0' in metrics
    assert 'outcome="model_error"' not in metrics


async def test_inputs_every_version_crashes_on_never_roll_back(served: str, gateway_factory: Any) -> None:
    """NaN, null and blank cells make scikit-learn raise inside predict: MLflow answers them with the very
    400 it gives for a broken model. Replayed to the previous version, which crashes on them too, they
    count as the client's errors, and a flood of them never rolls the new version back."""
    store, url = await _green_just_switched_to(served, gateway_factory)
    nan = b'{"dataframe_split": {"columns": ["sepal_length", "sepal_width", "petal_length", "petal_width"], "data": [[NaN, 3.5, 1.4, 0.2]]}}'
    null = json.dumps({"dataframe_split": {"columns": COLUMNS, "data": [[None, 3.5, 1.4, 0.2]]}}).encode()
    blank = (",".join(COLUMNS) + "\n5.1,,1.4,0.2\n").encode()
    bad = [(nan, "application/json"), (null, "application/json"), (blank, "text/csv")]
    statuses = []
    async with aiohttp.ClientSession() as s:
        for n in range(90):
            body, content_type = bad[n % 3]
            async with s.post(url + "/invocations", data=body, headers={"Content-Type": content_type}) as resp:
                answer = await resp.json()
                statuses.append(resp.status)
            if n < 3:
                assert answer["message"].startswith("Encountered an unexpected error while evaluating the model"), answer
            await asyncio.sleep(0.01)

        async def judged() -> bool:
            async with s.get(url + "/metrics") as resp:
                text = await resp.text()
            return 'turnout_replays_total{service="default",verdict="input"} 90.0' in text

        await eventually(judged, timeout=20)
        async with s.get(url + "/metrics") as resp:
            metrics = await resp.text()
    assert statuses == [400] * 90
    assert (await store.read_snapshot()).route.active == "green", "never rolled back"
    assert 'turnout_requests_total{code="400",deployment="green",outcome="client_error",service="default"} 90.0' in metrics
    assert 'outcome="model_error"' not in metrics
