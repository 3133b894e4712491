"""Small scikit-learn models registered in a local MLflow registry, for the demo, ``turnout up`` and tests.

v1 and v2 are sound iris classifiers; v3 wraps v2 and raises inside ``predict`` for a share of rows, so
MLflow answers those requests with its 400-with-stack-trace (the failure a status-code check misses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
# v3 fails on rows with a sepal longer than this: about a third of iris.
FAULT_THRESHOLD = 6.3


class FaultyModel(mlflow.pyfunc.PythonModel):
    """Predicts like the model it wraps, but raises for rows with a long sepal (a simulated bug)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    # No type hints on predict: MLflow would try (and fail) to derive a schema from them.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        """Raise when any row triggers the bug, else delegate."""
        if (model_input["sepal_length"] > FAULT_THRESHOLD).any():
            raise ValueError(f"simulated bug: sepal_length above {FAULT_THRESHOLD} is not handled")
        return self.inner.predict(model_input)


@dataclass(frozen=True)
class SampleRegistry:
    """Where the registry is and what it holds."""

    tracking_uri: str
    model_name: str
    versions: list[str]


def iris_rows() -> list[list[float]]:
    """The iris measurements as plain rows (bundled with scikit-learn, no download)."""
    from sklearn.datasets import load_iris

    return load_iris().data.tolist()


def build(root: Path, model_name: str = "iris-demo", with_faulty: bool = True) -> SampleRegistry:
    """Create a sqlite registry under ``root`` with v1, v2 (and the faulty v3) of ``model_name``."""
    root.mkdir(parents=True, exist_ok=True)
    # Artifacts next to the database: the default would be ./mlruns in the current directory.
    return register(f"sqlite:///{root / 'mlflow.db'}", model_name, with_faulty, (root / "artifacts").as_uri())


def register(
    tracking_uri: str, model_name: str = "iris-demo", with_faulty: bool = True, artifact_location: str | None = None
) -> SampleRegistry:
    """Register v1, v2 (and the faulty v3) of ``model_name`` in any MLflow registry; a model that
    already has versions is left as it is."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    existing = [str(v.version) for v in client.search_model_versions(f"name = '{model_name}'")]
    if existing:
        return SampleRegistry(tracking_uri, model_name, sorted(existing, key=int))
    experiment = client.get_experiment_by_name("turnout")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("turnout", artifact_location=artifact_location)
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    data = load_iris(as_frame=True)
    X = pd.DataFrame(data.data.values, columns=FEATURES)
    y = data.target
    # Input examples below the fault threshold: the warm-up request must pass even for v3.
    example = X[X["sepal_length"] <= FAULT_THRESHOLD].head(2)
    v1 = LogisticRegression(max_iter=300).fit(X, y)
    v2 = DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, y)
    signature = infer_signature(X, v2.predict(X))
    for model in (v1, v2):
        with mlflow.start_run():
            mlflow.sklearn.log_model(
                model, name="model", registered_model_name=model_name, input_example=example, signature=signature,
                skops_trusted_types=["sklearn.tree._tree.Tree"],
            )
    if with_faulty:
        with mlflow.start_run():
            mlflow.pyfunc.log_model(
                name="model", python_model=FaultyModel(v2), registered_model_name=model_name,
                input_example=example, signature=signature,
            )
    versions = [str(v.version) for v in client.search_model_versions(f"name = '{model_name}'")]
    return SampleRegistry(tracking_uri, model_name, sorted(versions, key=int))
