"""``turnout gateway`` as a real process: settings from flags and env, bounded memory, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import gateway_subprocess
from tests.support import BIN, RawConnection, child_env, eventually, post

MB = 1024 * 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


SHUTDOWN_TIMEOUT = 3.0


@pytest.fixture(params=["fast", "aiohttp"])
async def gateway_process(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """A gateway process on the real Redis (private namespace), routed to a local backend, on each request path."""
    async with gateway_subprocess("--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
                                  TURNOUT_FAST_PATH=str(request.param == "fast").lower()) as gateway:
        yield gateway


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(url + "/health") as resp:
        return resp.status == 200


async def test_fifty_megabytes_stream_both_ways_in_bounded_memory(gateway_process: dict[str, Any]) -> None:
    url, pid = gateway_process["url"], gateway_process["proc"].pid
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(block * 50).hexdigest()

    async def upload() -> Iterator[bytes]:  # type: ignore[misc]
        for _ in range(50):
            yield block

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await eventually(lambda: _ready(s, url), timeout=10)
        baseline = peak_rss_mb(pid)
        # Declared length, then chunked: both framings stream.
        async with s.post(url + "/invocations", data=block * 50) as resp:
            assert (await resp.json())["sha256"] == expected
        async with s.post(url + "/invocations", data=upload()) as resp:
            body = await resp.json()
            assert body["length"] == 50 * MB and body["sha256"] == expected
        async with s.post(url + "/invocations?mode=big&size=" + str(50 * MB), data=b"{}") as resp:
            received = 0
            async for chunk in resp.content.iter_any():
                received += len(chunk)
            assert received == 50 * MB
    growth = peak_rss_mb(pid) - baseline
    # Holding even one body would add 50 MiB; streaming keeps a few socket buffers.
    assert growth < 20, f"gateway peak RSS grew by {growth:.1f} MiB"


async def test_sigterm_drains_inflight_requests(gateway_process: dict[str, Any]) -> None:
    url, proc = gateway_process["url"], gateway_process["proc"]
    async with aiohttp.ClientSession() as s:
        await eventually(lambda: _ready(s, url), timeout=10)

        async def slow() -> tuple[int, str | None]:
            async with s.post(url + "/invocations?mode=slow&delay=1.0", json={}) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Connection")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        status, connection = await task
        assert status == 200, "a request in flight at SIGTERM must complete"
        assert connection == "close", "an answer finished during the drain closes its connection"
    code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
    assert code == 0
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.post(url + "/invocations", json={})


async def test_sigterm_ends_within_the_shutdown_timeout_whatever_is_in_flight(gateway_process: dict[str, Any]) -> None:
    """Requests on both paths that would outlive the drain: the process still exits in time (one drain
    for both paths, not one after the other)."""
    url, proc = gateway_process["url"], gateway_process["proc"]
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        await eventually(lambda: _ready(s, url), timeout=10)
        small = RawConnection.open(url)
        conns = [await small, await RawConnection.open(url)]
        conns[0].send(post("/invocations?mode=slow&delay=60", b"{}"))  # the fast path when it is on
        conns[1].send(b"POST /invocations?mode=slow&delay=60 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                      b"\r\n2\r\n{}\r\n0\r\n\r\n")  # always aiohttp's path
        await asyncio.sleep(0.5)
        started = loop.time()
        proc.send_signal(signal.SIGTERM)
        code = await loop.run_in_executor(None, proc.wait, 30)
        took = loop.time() - started
        for conn in conns:
            conn.close()
    assert code == 0
    assert took < SHUTDOWN_TIMEOUT + 2.5, f"exit took {took:.1f} s with a shutdown timeout of {SHUTDOWN_TIMEOUT} s"


def test_bad_setting_is_a_usage_error() -> None:
    result = subprocess.run(
        [str(BIN / "turnout"), "gateway"], env=child_env(TURNOUT_POLL_INTERVAL="soon"), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "TURNOUT_POLL_INTERVAL='soon' is not a valid float" in result.stderr
    result = subprocess.run(
        [str(BIN / "turnout"), "gateway", "--connect-timeout", "-1"], env=child_env(), capture_output=True, text=True
    )
    assert result.returncode == 2 and "connect_timeout must be positive" in result.stderr
