"""``turnout gateway --processes N``: N processes behind one port and one parent, /metrics summing them
all, a killed process restarted, SIGTERM stopping every one; refused on the embedded store."""

from __future__ import annotations

import asyncio
from collections import Counter
import glob
import os
import signal
import subprocess
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.siblings import ProcessSlot, Siblings, merge, socket_path
from tests.conftest import gateway_subprocess
from tests.support import BIN, child_env, eventually, processes_with_env

SHUTDOWN_TIMEOUT = 3.0


@pytest.fixture
async def two_processes() -> AsyncIterator[dict[str, Any]]:
    """``turnout gateway --processes 2`` on the real Redis, both processes listening."""
    tag = uuid.uuid4().hex
    async with gateway_subprocess("--processes", "2", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
                                  TURNOUT_TEST_GATEWAY=tag) as gateway:
        parent = gateway["proc"].pid

        def processes() -> list[int]:
            """The gateway processes alive now (everything the parent started inherits the tag)."""
            return sorted(pid for pid, cmd in processes_with_env(f"TURNOUT_TEST_GATEWAY={tag}")
                          if pid != parent and "gateway.processes" in cmd)

        gateway["processes"] = processes
        async with aiohttp.ClientSession() as session:
            gateway["session"] = session
            # A process joins its siblings' sums once it listens: two in the sum, two serving.
            await eventually(lambda: _gauge(session, gateway["url"], "turnout_gateway_processes", 2.0), timeout=30)
            yield gateway


async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One /metrics answer: sample name → (labels, value) of each sample."""
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


async def _gauge(session: aiohttp.ClientSession, url: str, name: str, wanted: float) -> bool:
    return [v for _, v in (await _scrape(session, url)).get(name, [])] == [wanted]


async def _send(url: str, count: int, workers: int) -> tuple[int, list[str]]:
    """``count`` predictions, each on a new connection (so the kernel spreads them over the processes),
    ``workers`` at a time: (answered 200, failures)."""
    ok, failures = 0, []
    left = iter(range(count))

    async def worker() -> None:
        nonlocal ok
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in left:
                try:
                    async with session.post(url + "/invocations", json={"inputs": [[1, 2]]}) as resp:
                        await resp.read()
                        if resp.status == 200:
                            ok += 1
                        else:
                            failures.append(f"HTTP {resp.status}")
                except aiohttp.ClientConnectionError as exc:
                    failures.append(repr(exc))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return ok, failures


def _requests(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float:
    return sum(v for _, v in samples.get("turnout_requests_total", []))


def _per_process(samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, float]:
    return {labels["process"]: v for labels, v in samples.get("turnout_process_requests_total", [])}


def _run_dirs(parent: int) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), f"turnout-gateway-{parent}-*"))


async def test_one_scrape_sums_every_process(two_processes: dict[str, Any]) -> None:
    url, session = two_processes["url"], two_processes["session"]
    ok, failures = await _send(url, 300, workers=4)
    assert (ok, failures) == (300, [])
    samples = await _scrape(session, url)
    assert _requests(samples) == 300, "one scrape reports the requests of both processes"
    per_process = _per_process(samples)
    assert sorted(per_process) == ["0", "1"] and sum(per_process.values()) == 300, per_process
    assert min(per_process.values()) > 0, f"both processes served: {per_process}"
    # The histogram is summed bucket by bucket, so it stays a histogram of all 300.
    counts = [v for labels, v in samples["turnout_request_duration_seconds_count"] if labels["deployment"] == "blue"]
    assert counts == [300.0]
    assert [v for _, v in samples["turnout_store_up"]] == [1.0]
    # One process's guard leads (once it has looked), and the maximum says so.
    await eventually(lambda: _gauge(session, url, "turnout_guard_leader", 1.0), timeout=30)
    assert sum(v for _, v in samples["turnout_sibling_scrape_errors_total"]) == 0
    # Whichever process answers the next scrape, it sums the same.
    for _ in range(6):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            assert _requests(await _scrape(fresh, url)) == 300


async def test_a_killed_process_is_restarted_and_serving_goes_on(two_processes: dict[str, Any]) -> None:
    url, session, processes = two_processes["url"], two_processes["session"], two_processes["processes"]
    before = processes()
    assert len(before) == 2, before
    workers = 4
    sending = asyncio.create_task(_send(url, 400, workers=workers))
    await asyncio.sleep(0.3)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: len(processes()) == 2 and victim not in processes(), timeout=30)
    ok, failures = await sending
    # Only connections the killed process held can fail: each worker has one open at a time.
    assert len(failures) <= workers, failures
    assert all("HTTP" not in f for f in failures), f"only lost connections, never an error answer: {failures}"
    assert ok + len(failures) == 400
    # The new process joins the sums and serves.
    await eventually(lambda: _gauge(session, url, "turnout_gateway_processes", 2.0), timeout=30)
    per_process_before = _per_process(await _scrape(session, url))
    ok, failures = await _send(url, 200, workers=4)
    assert (ok, failures) == (200, [])
    per_process = _per_process(await _scrape(session, url))
    assert all(per_process[i] > per_process_before.get(i, 0) for i in ("0", "1")), (per_process_before, per_process)


async def test_sigterm_to_the_parent_drains_and_stops_every_process(two_processes: dict[str, Any]) -> None:
    url, proc, processes = two_processes["url"], two_processes["proc"], two_processes["processes"]
    children = processes()
    assert len(children) == 2
    run_dirs = _run_dirs(proc.pid)
    assert len(run_dirs) == 1 and sorted(os.listdir(run_dirs[0])) == ["p0.sock", "p1.sock"]

    async def slow() -> int:
        async with aiohttp.ClientSession() as s, s.post(url + "/invocations?mode=slow&delay=1.0", json={}) as resp:
            await resp.read()
            return resp.status

    # Several, so that both processes are likely to hold one.
    tasks = [asyncio.create_task(slow()) for _ in range(6)]
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.gather(*tasks) == [200] * 6, "requests in flight at SIGTERM complete"
    code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code
    assert processes() == []
    assert _run_dirs(proc.pid) == [], "the run directory and its sockets are gone"


async def test_a_process_that_cannot_listen_fails_the_start() -> None:
    """The port is taken by a socket without SO_REUSEPORT: the parent stops the other process and exits 1."""
    tag = uuid.uuid4().hex
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with gateway_subprocess("--processes", "2", port=port, TURNOUT_TEST_GATEWAY=tag) as gateway:
            proc = gateway["proc"]
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
            stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 1, stderr
    assert f"127.0.0.1:{port} is in use" in stderr, stderr
    assert [pid for pid, _ in processes_with_env(f"TURNOUT_TEST_GATEWAY={tag}")] == []
    assert _run_dirs(proc.pid) == []


async def test_a_second_run_on_the_same_port_is_refused(two_processes: dict[str, Any]) -> None:
    """Every process of a run binds with SO_REUSEPORT, so a second run would share the port unnoticed and
    take half the connections: the parent looks first, without SO_REUSEPORT."""
    port = int(two_processes["url"].rsplit(":", 1)[1])
    async with gateway_subprocess("--processes", "2", port=port) as second:
        proc = second["proc"]
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 1 and "is in use" in stderr, stderr
    ok, failures = await _send(two_processes["url"], 20, workers=2)
    assert (ok, failures) == (20, [])


async def test_a_burst_of_concurrent_scrapes_each_sums_every_process(two_processes: dict[str, Any]) -> None:
    """/metrics needs no token: 400 scrapes at once (on new connections, so both processes get some) must
    each sum both processes, or counters seem to go down and Prometheus sees resets."""
    url = two_processes["url"]
    ok, _ = await _send(url, 100, workers=4)
    assert ok == 100
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as fresh:
        answers = await asyncio.gather(*(_scrape(fresh, url) for _ in range(400)))
    assert Counter(_requests(samples) for samples in answers) == {100.0: 400}


@pytest.mark.parametrize(("args", "env"), [(["--processes", "2"], {}), ([], {"TURNOUT_PROCESSES": "2"})])
def test_more_than_one_process_needs_redis(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([str(BIN / "turnout"), "gateway", *args], env=child_env(**env), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "processes=2 needs Redis (--redis-url or TURNOUT_REDIS_URL)" in result.stderr, result.stderr


async def test_a_sibling_that_does_not_answer_is_left_out_and_counted(tmp_path: Path) -> None:
    """One sibling accepts and never answers, another left its socket behind: the scrape answers after the
    deadline with this process's own figures, and counts both."""
    metrics = GatewayMetrics()
    metrics.deployment("default", "blue").observe(200, "ok", 0.001)
    siblings = Siblings(ProcessSlot(tmp_path, 0), metrics, deadline=0.2)
    await siblings.start()
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    mute = await asyncio.start_unix_server(silent, str(socket_path(tmp_path, 1)))
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(socket_path(tmp_path, 2)))
    try:
        text = (await siblings.exposition()).decode()
    finally:
        mute.close()
        for writer in held:
            writer.close()
        await siblings.stop()
    assert "turnout_gateway_processes 1.0" in text
    assert 'turnout_requests_total{code="200",deployment="blue",outcome="ok",service="default"} 1.0' in text
    assert 'turnout_sibling_scrape_errors_total{reason="timeout"} 1.0' in text
    assert 'turnout_sibling_scrape_errors_total{reason="unreachable"} 1.0' in text
    assert not socket_path(tmp_path, 0).exists(), "a process removes its socket when it stops"


def test_merge_rules() -> None:
    """Counters and histograms add up; state gauges take the maximum, per-process views the minimum."""
    def families(requests: float, ready: float, active: float, inflight: float) -> list[Any]:
        text = (
            "# TYPE turnout_requests counter\n"
            f'turnout_requests_total{{service="s",deployment="d",code="200",outcome="ok"}} {requests}\n'
            "# TYPE turnout_replica_ready gauge\n"
            f'turnout_replica_ready{{service="s",deployment="d",replica="r"}} {ready}\n'
            "# TYPE turnout_active_deployment gauge\n"
            f'turnout_active_deployment{{service="s",deployment="d"}} {active}\n'
            "# TYPE turnout_inflight_requests gauge\n"
            f'turnout_inflight_requests{{service="s",deployment="d"}} {inflight}\n'
        )
        return list(text_string_to_metric_families(text))

    merged = merge({0: families(3, 1, 1, 2), 1: families(4, 0, 0, 5)}).decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in merged.splitlines() if not line.startswith("#")}
    assert values['turnout_requests_total{code="200",deployment="d",outcome="ok",service="s"}'] == 7
    assert values['turnout_replica_ready{deployment="d",replica="r",service="s"}'] == 0
    assert values['turnout_active_deployment{deployment="d",service="s"}'] == 1
    assert values['turnout_inflight_requests{deployment="d",service="s"}'] == 7
    assert values["turnout_gateway_processes"] == 2
    assert values['turnout_process_requests_total{process="0"}'] == 3
    assert values['turnout_process_requests_total{process="1"}'] == 4
