"""Whose fault is a response: the model's or the client's. Only error responses are ever inspected."""

from __future__ import annotations

import json

from .metrics import CLIENT_ERROR, MODEL_ERROR, OK

# MLflow answers an exception inside ``predict`` with HTTP 400 and this message (field-notes).
_MODEL_CRASH_MESSAGE = "Encountered an unexpected error while evaluating the model"

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
    if len(body) > MAX_INSPECTED_BODY or b"error_code" not in body:
        return False
    try:
        error = json.loads(body)
    except ValueError:
        return False
    if not isinstance(error, dict) or error.get("error_code") != "BAD_REQUEST":
        return False
    message = error.get("message")
    return "stack_trace" in error or (isinstance(message, str) and message.startswith(_MODEL_CRASH_MESSAGE))
