"""A real MLflow sqlite registry with tiny scikit-learn models, and real ``mlflow models serve`` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import BIN, child_env, free_port


@dataclass(frozen=True)
class Registry:
    """Where the registry lives and what it holds."""

    tracking_uri: str
    model_name: str
    versions: dict[str, str]  # version -> runs:/ URI
    env: dict[str, str]


def build_registry(root: Path, model_name: str = "iris") -> Registry:
    """Train and register v1 (logistic regression) and v2 (decision tree), alias ``champion`` → v2."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    # Artifacts next to the database: the default would be ./mlruns in the current directory.
    experiment_id = client.create_experiment("turnout-tests", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    iris = load_iris(as_frame=True)
    X: pd.DataFrame = iris.data.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    y = iris.target
    versions: dict[str, str] = {}
    for model in (LogisticRegression(max_iter=300), DecisionTreeClassifier(max_depth=3)):
        model.fit(X, y)
        with mlflow.start_run() as run:
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                registered_model_name=model_name,
                input_example=X.head(2),
                signature=infer_signature(X, model.predict(X)),
                skops_trusted_types=["sklearn.tree._tree.Tree"],
            )
        versions[str(info.registered_model_version)] = f"runs:/{run.info.run_id}/model"
    client.set_registered_model_alias(model_name, "champion", "2")
    return Registry(tracking_uri, model_name, versions, env)


@contextlib.contextmanager
def model_server(registry: Registry, model_uri: str, timeout: float = 90) -> Iterator[str]:
    """``mlflow models serve`` for one model URI; yields its URL once ``/ping`` answers."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "-p", str(port), "-h", "127.0.0.1", "--env-manager", "local"],
        env=registry.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"model server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/ping", timeout=1) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("model server did not answer /ping in time")
            time.sleep(0.2)
        yield url
    finally:
        # The CLI and its uvicorn child share a process group: signal the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
