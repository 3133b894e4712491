"""Record the Redis keys the previous release (single route, before services) writes, for
``tests/test_services.py``'s backward-compatibility test:

    python -m tests.record_legacy_layout OLD_CHECKOUT > tests/fixtures/legacy_layout.json

``OLD_CHECKOUT`` is a checkout of that release (``git worktree add /tmp/old 29beaae``). Its gateway runs
against the test Redis under a private namespace; the script drives it through its own admin API (two
external deployments, a switch, a rollback, a refused switch, a paused guard, a deleted deployment)
and dumps every key it wrote, with the namespace replaced by ``{ns}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import redis

from tests.support import free_port, wait_port

REDIS_URL = os.environ.get("TURNOUT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _call(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "X-Turnout-Actor": "recorder"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def record(old_checkout: str) -> dict[str, Any]:
    """Drive the old gateway, then dump its keys."""
    namespace = f"turnout-legacy-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": old_checkout, "TURNOUT_REDIS_URL": REDIS_URL,
           "TURNOUT_NAMESPACE": namespace, "TURNOUT_PORT": str(port), "TURNOUT_REGISTRY_SYNC": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "gateway"], cwd=old_checkout, env=env)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        steps = [
            ("POST", "/admin/deployments", {"name": "blue", "url": "http://127.0.0.1:9/"}),
            ("POST", "/admin/deployments", {"name": "green", "url": "http://127.0.0.1:9/", "mlflow_name": "iris", "mlflow_version": "2"}),
            ("POST", "/admin/deployments", {"name": "old", "url": "http://127.0.0.1:9/"}),
            ("POST", "/admin/switch", {"target": "blue", "reason": "first"}),
            ("POST", "/admin/switch", {"target": "green", "reason": "v2"}),
            ("POST", "/admin/rollback", {"reason": "p99 doubled"}),
            ("POST", "/admin/switch", {"target": "green", "expected_generation": 1, "reason": "stale"}),
            ("POST", "/admin/switch", {"target": "green", "reason": "again"}),
            ("DELETE", "/admin/deployments/old?reason=unused", None),
            ("POST", "/admin/guard", {"paused": True, "reason": "maintenance"}),
        ]
        for method, path, body in steps:
            status, answer = _call(base, method, path, body)
            print(method, path, status, file=sys.stderr)
        time.sleep(0.5)
        keys: dict[str, Any] = {}
        for key in sorted(client.scan_iter(f"{namespace}:*")):
            kind = client.type(key)
            name = "{ns}" + key[len(namespace):]
            if kind == "hash":
                keys[name] = {"type": kind, "value": client.hgetall(key)}
            elif kind == "set":
                keys[name] = {"type": kind, "value": sorted(client.smembers(key))}
            elif kind == "list":
                keys[name] = {"type": kind, "value": client.lrange(key, 0, -1)}
            elif kind == "string":
                keys[name] = {"type": kind, "value": client.get(key)}
        return keys
    finally:
        proc.terminate()
        proc.wait(10)
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
        client.close()


if __name__ == "__main__":
    dump = {"recorded_with": "Turnout before services (commit 29beaae), through its admin API",
            "keys": record(sys.argv[1])}
    json.dump(dump, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
