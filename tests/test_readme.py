"""The README is executable: its "Try it by hand" walkthrough, read out of README.md (never copied into
this file), runs exactly as written against ``./run up`` and tells the story it says it tells."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.support import ROOT, child_env

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"<!-- walkthrough:(\w+) -->\n```sh\n(.*?)```", re.S)


def walkthrough() -> dict[str, str]:
    """The marked shell blocks of the README, by name."""
    return dict(BLOCK.findall((ROOT / "README.md").read_text()))


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _get(path: str) -> dict:
    request = urllib.request.Request("http://127.0.0.1:8080" + path, headers={"Authorization": "Bearer change-me"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def test_the_readme_walkthrough_runs_as_written() -> None:
    blocks = walkthrough()
    assert list(blocks) == ["up", "cli", "curl", "services", "replicas", "canary", "shadow"], "the README's walkthrough blocks"
    assert _port_free(8080), "the walkthrough uses port 8080, as the README says; something else holds it"
    env = child_env()
    up = subprocess.Popen(["bash", "-c", blocks["up"]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if line.startswith("Turnout is up"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(300), "".join(lines[-40:])
        story = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(blocks[b] for b in ("cli", "curl", "services", "replicas", "canary", "shadow"))],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        output = story.stdout + story.stderr
        assert story.returncode == 0, output[-4000:]
        assert '"error_code"' not in story.stdout, output[-4000:]
        # What the README says happened, happened: the guard rolled the faulty version back to blue.
        request = urllib.request.Request("http://127.0.0.1:8080/admin/history?limit=100",
                                         headers={"Authorization": "Bearer change-me"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            entries = json.loads(resp.read())["entries"]
        guard = [e for e in entries if e["action"] == "rollback" and e["trigger"] == "guard" and e["result"] == "applied"]
        assert guard and guard[-1]["from"] == "broken" and guard[-1]["to"] == "blue", entries
        assert "active=blue" in story.stdout
        # The second service answers on its own URL and its switches left the default service alone.
        assert story.stdout.count('"predictions"') == 3, output[-4000:]  # two in the cli block, one for loans
        loans = _get("/admin/services/loans/state")
        # The canary moved loans from green back to blue: a split (generation 3), then the promotion (4).
        assert (loans["route"]["active"], loans["route"]["previous"], loans["route"]["generation"]) == ("blue", "green", 4), loans
        assert loans["canary"]["state"] == "promoted" and loans["canary"]["sticky_header"] == "x-user-id", loans["canary"]
        assert "canary: blue vs green, promoted" in story.stdout, output[-4000:]
        # The shadow compared green with blue on the 30 requests sent while it was on.
        assert "shadow green (ready) on 100% of blue's requests" in story.stdout and "agreement: " in story.stdout, output[-4000:]
        assert "stopped shadowing green" in story.stdout
        assert _get("/admin/state")["route"]["active"] == "blue"
        assert [s["name"] for s in _get("/admin/services")["services"]] == ["default", "loans"]
        # loans' green ran two warm replicas that both answered, and is back to one.
        assert "2/2 replicas ready" in story.stdout, output[-4000:]
        shown = story.stdout[story.stdout.index("2/2 replicas ready"):]
        answered = [int(n) for n in re.findall(r"(\d+) answered", shown)[:2]]
        assert len(answered) == 2 and min(answered) > 0, shown
        scales = [e["detail"] for e in _get("/admin/services/loans/history")["entries"] if e["action"] == "scale"]
        assert scales == ["replicas 2 → 1, min_ready all → all", "replicas 1 → 2, min_ready all → all"], scales
        green = _get("/admin/services/loans/deployments/green")
        assert (green["desired_replicas"], green["ready_replicas"], len(green["replicas"])) == (1, 1, 1), green
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            code = up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            code = up.wait()
        reader.join(5)
    assert code == 0, "".join(lines[-40:])
    deadline = time.monotonic() + 30
    while not _port_free(8080) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _port_free(8080), "Ctrl-C stops the gateway"
