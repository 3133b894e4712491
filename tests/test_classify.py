"""The classifier against every error answer recorded from a real ``mlflow models serve``.

The expectations are written here, apart from the recorded answers (tests/fixtures/mlflow_errors.json,
re-recorded by ``python -m tests.record_mlflow_errors``): a new kind of answer fails until someone
decides whose fault it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.classify import classify
from gateway.metrics import CLIENT_ERROR, MODEL_ERROR, OK

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "mlflow_errors.json").read_text())["answers"]

# Whose fault each answer is. The model's: a crash inside predict (even when the client's NaN set it
# off: a model that cannot take NaN is the model's problem to handle) and any 5xx. Everything that
# MLflow rejects while reading the payload is the client's, stack trace or not.
EXPECTED = {
    "model-raises-in-predict": MODEL_ERROR,
    "json-nan-makes-predict-raise": MODEL_ERROR,
    "json-nested-too-deep": MODEL_ERROR,  # MLflow's own 500 (a RecursionError in its parser)
    "no-content-type": MODEL_ERROR,  # MLflow's 500; the gateway answers 415 itself and never sends it
    "json-malformed": CLIENT_ERROR,
    "json-empty-body": CLIENT_ERROR,
    "json-null": CLIENT_ERROR,
    "json-list": CLIENT_ERROR,
    "json-no-input-field": CLIENT_ERROR,
    "json-two-input-fields": CLIENT_ERROR,
    "json-ragged-split": CLIENT_ERROR,
    "json-wrong-columns": CLIENT_ERROR,
    "json-strings-for-floats": CLIENT_ERROR,
    "json-unnamed-inputs": CLIENT_ERROR,
    "json-utf16-charset": CLIENT_ERROR,
    "csv-non-number": CLIENT_ERROR,
    "csv-not-utf8": CLIENT_ERROR,
    "csv-empty": CLIENT_ERROR,
    "csv-wrong-columns": CLIENT_ERROR,
    "parquet-not-parquet": CLIENT_ERROR,
    "unsupported-content-type": CLIENT_ERROR,
    "text-plain": CLIENT_ERROR,
}


def test_every_recorded_answer_has_a_decision() -> None:
    assert set(RECORDED) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_mlflow_answer(name: str) -> None:
    answer = RECORDED[name]
    assert answer["status"] >= 400, "every recorded case is an error answer"
    assert classify(answer["status"], answer["body"].encode()) == EXPECTED[name]


def test_client_parse_failures_with_a_stack_trace_are_still_the_clients() -> None:
    """The bug this table was built for: a stack trace alone used to make a model failure."""
    with_trace = [n for n, a in RECORDED.items() if "stack_trace" in a["body"] and EXPECTED[n] == CLIENT_ERROR]
    assert with_trace, "MLflow attaches stack traces to some client errors"


def test_success_and_bodies_not_read() -> None:
    assert classify(200, None) == OK
    assert classify(400, None) == CLIENT_ERROR  # a streamed (large) 400 is never the model's crash answer
    assert classify(503, None) == MODEL_ERROR
    assert classify(400, b"not json Encountered an unexpected error while evaluating the model") == CLIENT_ERROR
