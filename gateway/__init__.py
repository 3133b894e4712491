"""Turnout: a blue/green traffic-switching gateway for MLflow model servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("turnout")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
