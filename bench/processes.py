"""Gateway processes: throughput of ``turnout gateway --processes 2`` against one process, side by side in
one run, in front of the same fast stand-in (each gateway in its own namespace of the machine's Redis).

Rounds in rotating order; in each, both gateways get wrk at 32 connections. The ratio is the median of
per-round ratios. On a 2-core machine the load generator, the stand-in and the gateway processes share
the two cores, so a second process has no core of its own: the ratio stays well under 2 (it says what
the supervision and the SO_REUSEPORT split cost when nothing is gained, not what a bigger box gains).
After the rounds, one scrape of the two-process gateway's /metrics is checked against what wrk sent it.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from typing import Any

from bench.common import BODY, HERE, child_pids, free_port, process, wrk
from bench.proxy_overhead import _measure, _median, _paired, gateway_in_front_of

CONNECTIONS = 32
PATHS = ("one", "two")


def _scrape(url: str) -> dict[str, float]:
    """From one /metrics answer: the processes it sums, requests in all and per process."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {"requests": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "turnout_requests_total":
                out["requests"] += sample.value
            elif sample.name == "turnout_gateway_processes":
                out["processes"] = sample.value
            elif sample.name == "turnout_process_requests_total":
                out[f"process_{sample.labels['process']}"] = sample.value
    return out


def _wait_processes(url: str, count: int, timeout: float = 60) -> None:
    """Until one scrape sums ``count`` processes (each joins its siblings' sums once it listens)."""
    deadline = time.monotonic() + timeout
    while _scrape(url).get("processes") != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never summed {count} processes")
        time.sleep(0.2)


def run(quick: bool = False) -> dict[str, Any]:
    """Both gateways, ``rounds`` rounds; ``quick`` shortens each measurement."""
    seconds, rounds = (3, 1) if quick else (10, 3)
    port = free_port()
    backend = f"http://127.0.0.1:{port}"
    out: dict[str, list[dict[str, float]]] = {name: [] for name in PATHS}
    with process([sys.executable, str(HERE / "fast_backend.py"), str(port)], backend + "/ping"), \
            gateway_in_front_of(backend) as (one, one_procs), \
            gateway_in_front_of(backend, args=("--processes", "2")) as (two, two_procs):
        _wait_processes(two, 2)
        paths = {"one": (one, [p.pid for p in one_procs]), "two": (two, child_pids(two_procs[0].pid))}
        for url, _ in paths.values():
            wrk(url + "/invocations", BODY, connections=CONNECTIONS, seconds=1)  # warm-up
        before = _scrape(two)["requests"]
        for i in range(rounds):
            order = PATHS[i % 2:] + PATHS[: i % 2]
            for name in order:
                url, pids = paths[name]
                out[name].append(_measure(url, BODY, pids, CONNECTIONS, seconds))
        after = _scrape(two)
    sent = sum(r["requests"] for r in out["two"])
    counted = after["requests"] - before
    return {
        "connections": CONNECTIONS,
        "runs": out,
        "summary": {name: _median(runs) for name, runs in out.items()},
        "two_vs_one_rps": _paired(out, "two", "rps", lambda a, b: a / b, baseline="one"),
        "scrape": {"wrk_completed": sent, "metrics_counted": counted,
                   "per_process": {k: v for k, v in after.items() if k.startswith("process_")}},
    }


def table(result: dict[str, Any]) -> list[str]:
    """Markdown lines for RESULTS.md."""
    s = result["summary"]
    lines = [
        f"### Gateway processes — `--processes 2` against one process (fast backend, wrk, {result['connections']} "
        "connections, ~1 KB JSON; medians over rounds in rotating order)",
        "",
        "| gateway | req/s | p50 ms | p99 ms | gateway CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("one", "1 process"), ("two", "`--processes 2`")):
        r = s[name]
        lines.append(f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['cpu_us_per_request']:.0f} | {r['errors']:.0f} |")
    scrape = result["scrape"]
    split = ", ".join(f"{k.removeprefix('process_')}: {v:.0f}" for k, v in sorted(scrape["per_process"].items()))
    rounds = ", ".join(f"{b['rps'] / a['rps']:.2f}" for a, b in zip(result["runs"]["one"], result["runs"]["two"]))
    lines += [
        "",
        f"Two processes / one: **{result['two_vs_one_rps']:.2f}×** throughput (median of per-round ratios: "
        f"{rounds}). This machine has 2 cores shared by wrk, the stand-in, the gateway processes and whatever "
        "else runs on it, so a second gateway process gets no core of its own: the ratio is expected well under 2 "
        "and moves with the machine's other load (against busy neighbours, two processes also win a larger "
        "share of the CPU than one); it is not what a machine with spare cores gains.",
        f"One scrape of `/metrics` after the rounds counted {scrape['metrics_counted']:.0f} requests where wrk "
        f"completed {scrape['wrk_completed']:.0f} (wrk leaves out the answers in flight when it stops); "
        f"requests per process since start: {split}.",
    ]
    return lines


if __name__ == "__main__":
    import json

    res = run(quick="--quick" in sys.argv)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
