"""What a model URI is in the MLflow registry (name, version, alias), and its logged serving example.

Every function here blocks (MLflow's client is synchronous): call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

_BY_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_BY_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_BY_RUN = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")
_BY_MODEL_ID = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")


@dataclass(frozen=True, slots=True)
class RegistryInfo:
    """The registered model version a URI serves, where it has one."""

    name: str | None = None
    version: str | None = None
    alias: str | None = None


def resolve(model_uri: str) -> RegistryInfo:
    """Registered name and version for a model URI; an alias is resolved now, once, as MLflow's server does."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if m := _BY_VERSION.match(model_uri):
            version = client.get_model_version(m["name"], m["version"])
            return RegistryInfo(version.name, str(version.version))
        if m := _BY_ALIAS.match(model_uri):
            version = client.get_model_version_by_alias(m["name"], m["alias"])
            return RegistryInfo(m["name"], str(version.version), m["alias"])
        if m := _BY_RUN.match(model_uri):
            return _by_run(client, m["run_id"], m["path"])
        if m := _BY_MODEL_ID.match(model_uri):
            # Registered versions of a logged model name it as their source.
            run_id = client.get_logged_model(m["model_id"]).source_run_id
            for version in client.search_model_versions(f"run_id = '{run_id}'"):
                if version.source == model_uri:
                    return RegistryInfo(version.name, str(version.version))
    except MlflowException as exc:
        log.info("%s is not a registered model version (%s)", model_uri, exc.message)
    return RegistryInfo()


def _by_run(client: object, run_id: str, path: str) -> RegistryInfo:
    """A run's model is registered when some version's source points into that run at that path."""
    versions = client.search_model_versions(f"run_id = '{run_id}'")  # type: ignore[attr-defined]
    for version in versions:
        source = version.source or ""
        if source.rstrip("/").endswith("/" + path.strip("/")) or source == f"runs:/{run_id}/{path}":
            return RegistryInfo(version.name, str(version.version))
    # MLflow 3 stores sources as models:/m-<id>: a run with one registered model version is that one.
    if len(versions) == 1:
        return RegistryInfo(versions[0].name, str(versions[0].version))
    return RegistryInfo()


def serving_example(model_uri: str) -> str | None:
    """The ``/invocations`` body MLflow saved with the model's input example, if it was logged with one."""
    from mlflow.exceptions import MlflowException
    from mlflow.models.utils import load_serving_example

    try:
        example = load_serving_example(model_uri)
    except (MlflowException, OSError) as exc:
        log.info("%s has no serving input example (%s)", model_uri, exc)
        return None
    return example if isinstance(example, str) and example.strip() else None
