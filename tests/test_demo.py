"""The main job end to end: ``turnout demo`` and ``turnout up`` as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import BIN, child_env, free_port, processes_with_env

pytestmark = pytest.mark.slow


def test_demo_rolls_back_the_faulty_version_and_leaves_nothing(tmp_path: Path) -> None:
    summary_file = tmp_path / "summary.json"
    workdir = tmp_path / "demo"
    run = subprocess.run(
        [str(BIN / "turnout"), "demo", "--quick", "--workdir", str(workdir), "--json", str(summary_file)],
        env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["ok"] and summary["guard_rolled_back"]
    assert summary["client_errors_during_v1_to_v2_switch"] == 0
    assert summary["served_per_version"]["v1"] > 0 and summary["served_per_version"]["v2"] > 0
    assert summary["fault_to_rollback_seconds"] < 30
    # v2 shadowed v1 before the switch: every copied request was compared (the two versions are different
    # models, so they need not agree everywhere).
    shadow = summary["shadow"]
    assert shadow["requests"] > 20 and set(shadow["results"]) <= {"agree", "differ"}, shadow
    assert 0.5 < shadow["row_agreement"] <= 1.0, shadow
    # The canary at 10 % was aborted by its gate: v3 saw about a tenth of the requests, not all of them.
    canary = summary["canary"]
    assert canary["state"] == "aborted" and "error rate" in canary["outcome"], canary
    assert 15 <= canary["v3_requests"] < canary["requests"] / 3, canary
    assert summary["registry"]["aliases"] == {"production": 2}
    assert summary["registry"]["tags"]["3"]["turnout.status"] == "rolled_back"
    assert summary["leftover_processes"] == []
    # And by the process table: nothing still runs against the demo's registry.
    assert processes_with_env(f"MLFLOW_TRACKING_URI=sqlite:///{workdir / 'mlflow.db'}") == []
    assert "RESULT: the canary gate stopped v3 at 10%, the guard rolled it back" in run.stdout


def test_up_serves_a_prediction_and_stops_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    workdir = tmp_path / "up"
    proc = subprocess.Popen(
        [str(BIN / "turnout"), "up", "--port", str(port), "--workdir", str(workdir), "--admin-token", "t0ken"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        output = ""
        assert proc.stdout is not None
        while "Turnout is up" not in output:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, output
            output += line
            assert time.monotonic() < deadline, output
        while "Ctrl-C stops everything" not in output:
            output += proc.stdout.readline()
        assert "token: t0ken" in output and f"http://127.0.0.1:{port}/invocations" in output
        # What MLflow prints while the sample models are logged stays in the workdir's registry.log.
        assert "Warning" not in output and "WARNING" not in output and "INFO" not in output, output
        body = json.dumps({"dataframe_split": {"columns": ["sepal_length", "sepal_width", "petal_length", "petal_width"],
                                               "data": [[5.1, 3.5, 1.4, 0.2]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200 and json.loads(resp.read())["predictions"]
            assert resp.headers["X-Turnout-Deployment"] == "blue"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert processes_with_env(f"MLFLOW_TRACKING_URI=sqlite:///{workdir / 'mlflow.db'}") == []
