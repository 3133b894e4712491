"""Instructions per proxied request, counted by valgrind's callgrind: a figure that does not move with
the load of a shared machine (CPU-seconds here swing by 2-3x between runs), so two revisions can be
compared exactly. With ``TURNOUT_BENCH_BASELINE=REV`` the same requests are also counted through a
checkout of git revision REV, side by side.

One gateway process at a time runs under callgrind in front of the fast backend; a warm-up, then the
counters are zeroed, N keep-alive requests are sent over 8 connections, and the counters are dumped.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import targets
from bench.common import HERE, ROOT, child_env, free_port, process
from bench.proxy_overhead import REDIS_URL, _route

_BODY = b'{"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": [[5.1, 3.5, 1.4, 0.2]]}}'


def scoring_request(path: str = "/invocations", headers: bytes = b"") -> bytes:
    """The one-row JSON request every count sends, to ``path``, with ``headers`` (raw lines) added."""
    return b"POST %b HTTP/1.1\r\nHost: x\r\n%bContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        path.encode(), headers, len(_BODY), _BODY)


async def _load(port: int, requests: int, sent: Sequence[bytes], connections: int = 8,
                answered: Counter[str] | None = None) -> None:
    """``requests`` over ``connections``, going round ``sent`` (connection i starts at its own place);
    ``answered`` counts the deployment that answered each (its ``X-Turnout-Deployment``)."""
    async def one(count: int, first: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(first, first + count):
            writer.write(sent[i % len(sent)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            assert length, head
            if answered is not None:
                by = re.search(rb"(?i)x-turnout-deployment: ([^\r]*)", head)
                answered[by.group(1).decode() if by else "?"] += 1
            await reader.readexactly(int(length.group(1)))
        writer.close()

    each = requests // connections
    await asyncio.gather(*(one(each, i * each) for i in range(connections)))


Setup = Callable[[str, str, str], Awaitable[None]]


def count(tree: Path, backend: str, fast_path: bool, requests: int, *, setup: Setup = _route,
          path: str = "/invocations", sent: Sequence[bytes] | None = None,
          answered: Counter[str] | None = None, settle: float = 0.0,
          after: Callable[[int], None] | None = None) -> float:
    """Instructions per request of the gateway in ``tree`` (a checkout of this project), sending to
    ``path`` after ``setup(namespace, backend, "set")`` wrote its routes (``"clear"`` removes them);
    ``sent``: raw requests to go round instead (each connection from its own place in the list);
    ``answered``: counts which deployment answered each counted request; ``settle``: seconds to wait
    after the last answer before the counters are read (work left behind the answers, such as shadow
    copies, is counted too); ``after(port)``: called once they are read, while the gateway still runs."""
    requests_sent = list(sent) if sent else [scoring_request(path)]
    namespace = f"turnout-bench-{uuid.uuid4().hex[:8]}"
    asyncio.run(setup(namespace, backend, "set"))
    port = free_port()
    out = Path(tempfile.gettempdir()) / f"turnout-callgrind-{uuid.uuid4().hex[:8]}"
    # Background loops slowed to a crawl, so the count is the requests' own.
    environment = child_env(TURNOUT_REDIS_URL=REDIS_URL, TURNOUT_NAMESPACE=namespace, PYTHONPATH=str(tree),
                    TURNOUT_FAST_PATH=str(fast_path).lower(), TURNOUT_POLL_INTERVAL="1000",
                    TURNOUT_GUARD_INTERVAL="1000", TURNOUT_STATS_FLUSH_INTERVAL="1000")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c",
         "from gateway.cli import main; main()", "gateway", "--port", str(port), "--log-level", "WARNING"],
        env=environment, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                asyncio.run(_load(port, 80, requests_sent))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        asyncio.run(_load(port, 400, requests_sent))
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], capture_output=True, check=True)
        asyncio.run(_load(port, requests, requests_sent, answered=answered))
        time.sleep(settle)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, check=True)
        if after is not None:
            after(port)
    finally:
        proc.terminate()
        proc.wait()
        asyncio.run(setup(namespace, backend, "clear"))
    dumps = sorted((p for p in glob.glob(f"{out}*") if p != str(out)), key=os.path.getmtime)
    try:
        total = int(re.search(r"^summary: (\d+)", Path(dumps[0]).read_text(), re.M).group(1))  # type: ignore[union-attr]
    finally:
        for leftover in glob.glob(f"{out}*"):
            os.unlink(leftover)
    return total / requests


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A throwaway worktree of ``rev``."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def run(quick: bool = False) -> dict[str, Any]:
    """Count both request paths (and the baseline's, when asked for)."""
    requests = 800 if quick else 2000
    baseline = os.environ.get("TURNOUT_BENCH_BASELINE")
    port = free_port()
    backend = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"requests": requests, "baseline": baseline, "counts": {}}
    with process([sys.executable, str(HERE / "fast_backend.py"), str(port)], backend + "/ping"), \
            contextlib.ExitStack() as stack:
        trees = {"this tree": ROOT}
        if baseline:
            trees[baseline] = stack.enter_context(checkout(baseline))
        for path in ("fast", "aiohttp"):
            for name, tree in trees.items():
                result["counts"].setdefault(path, {})[name] = count(tree, backend, path == "fast", requests)
    if baseline:
        result["ratios"] = {path: c["this tree"] / c[baseline] for path, c in result["counts"].items()}
        result["target_met"] = all(r <= targets.INSTRUCTIONS_VS_BASELINE for r in result["ratios"].values())
    return result


def table(result: dict[str, Any]) -> list[str]:
    """Markdown for RESULTS.md."""
    names = list(next(iter(result["counts"].values())))
    lines = [
        "### Instructions per proxied request (callgrind; exact, unaffected by the machine's load)",
        "",
        "| path | " + " | ".join(names) + (" | ratio |" if result.get("ratios") else " |"),
        "|---|" + "---:|" * (len(names) + (1 if result.get("ratios") else 0)),
    ]
    for path, per in result["counts"].items():
        cells = [f"{per[n]:,.0f}" for n in names]
        if result.get("ratios"):
            cells.append(f"{result['ratios'][path]:.3f}×")
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines += ["", f"{result['requests']} one-row JSON requests over 8 keep-alive connections, fast backend."]
    if result.get("baseline"):
        lines.append(f"Baseline: `{result['baseline']}` (`TURNOUT_BENCH_BASELINE`), counted in the same run. "
                     f"Target ≤ {targets.INSTRUCTIONS_VS_BASELINE}× on both paths: "
                     f"{'met' if result['target_met'] else 'NOT met'}.")
    return lines
