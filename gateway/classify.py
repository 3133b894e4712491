"""Whose fault is a response: the model's or the client's. Only error responses are ever inspected.

A pure function of the status and the (small) error body, judged on evidence: the table of every
error answer mlflow models serve gives is in tests/fixtures/mlflow_errors.json (recorded from real
servers; tests/record_mlflow_errors.py re-records it).
"""

from __future__ import annotations

import json

from .metrics import CLIENT_ERROR, MODEL_ERROR, OK

# MLflow answers an exception raised inside ``predict`` with HTTP 400 and a message starting so. Its
# other 400s blame the input: parse failures of JSON, CSV or Parquet (some with a stack_trace too) and
# schema violations. Only this message is the model's fault.
MODEL_CRASH_MESSAGE = "Encountered an unexpected error while evaluating the model"

# Error bodies larger than this are not MLflow's small JSON errors; they are not parsed.
MAX_INSPECTED_BODY = 64 * 1024


def classify(status: int, body: bytes | None) -> str:
    """Outcome label of an upstream response: ok, client_error or model_error.

    ``body`` is the response body when it was read whole (it is for small error responses), else None.
    """
    if status < 400:
        return OK
    if status >= 500:
        return MODEL_ERROR
    if status == 400 and body is not None and _is_model_crash(body):
        return MODEL_ERROR
    return CLIENT_ERROR


def _is_model_crash(body: bytes) -> bool:
    """True for MLflow's 400 that reports an exception raised inside the model."""
    if len(body) > MAX_INSPECTED_BODY or MODEL_CRASH_MESSAGE.encode() not in body:
        return False
    try:
        error = json.loads(body)
    except ValueError:
        return False
    message = error.get("message") if isinstance(error, dict) else None
    return isinstance(message, str) and message.startswith(MODEL_CRASH_MESSAGE)
