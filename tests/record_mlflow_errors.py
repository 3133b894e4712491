"""Record every error answer we can provoke from a real ``mlflow models serve`` into
tests/fixtures/mlflow_errors.json, the table ``tests/test_classify.py`` holds the classifier to.

    .venv/bin/python -m tests.record_mlflow_errors

It trains the sample iris models (a sound v1 and v3, which raises inside ``predict`` for long sepals),
serves each with ``mlflow models serve`` and sends each case once. Stack traces are replaced by a marker
(they hold the recording machine's paths); everything else is kept byte for byte. Re-record after an
MLflow upgrade and look at the diff: a new kind of answer needs a decision in the classifier's test.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.mlflow_support import Registry, model_server
from tests.support import child_env, exchange

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mlflow_errors.json"
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
STACK_TRACE_MARKER = "<stack trace elided when recorded: it names the recording machine's paths>"


def _request(content_type: str | None, body: bytes) -> bytes:
    head = f"POST /invocations HTTP/1.1\r\nHost: mlflow\r\nContent-Length: {len(body)}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return (head + "\r\n").encode() + body


def _split(rows: list[list[Any]]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": COLUMNS, "data": rows}}).encode()


# name → (model version, Content-Type, body). v3 raises for sepal_length above 6.3.
CASES: dict[str, tuple[str, str | None, bytes]] = {
    "model-raises-in-predict": ("3", "application/json", _split([[7.0, 3.2, 4.7, 1.4]])),
    "json-nan-makes-predict-raise": ("1", "application/json",
                                     b'{"dataframe_split": {"columns": ' + json.dumps(COLUMNS).encode()
                                     + b', "data": [[NaN, 3.5, 1.4, 0.2]]}}'),
    "json-malformed": ("1", "application/json", b'{"dataframe_split": '),
    "json-empty-body": ("1", "application/json", b""),
    "json-null": ("1", "application/json", b"null"),
    "json-list": ("1", "application/json", b"[1, 2]"),
    "json-no-input-field": ("1", "application/json", b'{"foo": 1}'),
    "json-two-input-fields": ("1", "application/json", json.dumps({"inputs": [[1]], "instances": [[1]]}).encode()),
    "json-ragged-split": ("1", "application/json", json.dumps({"dataframe_split": {"columns": COLUMNS, "data": [[1, 2]]}}).encode()),
    "json-wrong-columns": ("1", "application/json", json.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}).encode()),
    "json-strings-for-floats": ("1", "application/json", _split([["a", "b", "c", "d"]])),
    "json-unnamed-inputs": ("1", "application/json", b'{"inputs": [[5.1, 3.5, 1.4, 0.2]]}'),
    "json-utf16-charset": ("1", "application/json; charset=utf-16", b'{"inputs": {}}'),
    "json-nested-too-deep": ("1", "application/json", b"[" * 100_000 + b"]" * 100_000),
    "csv-non-number": ("1", "text/csv", (",".join(COLUMNS) + "\n5.1,3.5,x,0.2\n").encode()),
    "csv-not-utf8": ("1", "text/csv", b"a,b\n\xff\xfe,1\n"),
    "csv-empty": ("1", "text/csv", b""),
    "csv-wrong-columns": ("1", "text/csv", b"a,b\n1,2\n"),
    "parquet-not-parquet": ("1", "application/vnd.apache.parquet", b"not parquet"),
    "unsupported-content-type": ("1", "application/octet-stream", b"x"),
    "text-plain": ("1", "text/plain", b"hello"),
    "no-content-type": ("1", None, b"{}"),
}


def _sanitize(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text)
    except ValueError:
        return text
    if isinstance(error, dict) and "stack_trace" in error:
        error["stack_trace"] = STACK_TRACE_MARKER
    text = json.dumps(error)
    # Any absolute path left in a message would be this machine's.
    return re.sub(r"(?<![:\w/])/(?:[\w.-]+/)+[\w.-]+", "<path>", text)


async def _record(urls: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (version, content_type, body) in CASES.items():
        ((status, headers, answer),) = await exchange(urls[version], _request(content_type, body), 1, timeout=60)
        out[name] = {
            "request": {"model": f"v{version}", "content_type": content_type, "body_bytes": len(body)},
            "status": status,
            "content_type": headers.get("content-type"),
            "body": _sanitize(answer),
        }
        print(f"{name}: {status}", file=sys.stderr)
    return out


def main() -> None:
    """Train, serve, ask, write the fixture."""
    from workers import samples

    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            built = samples.build(Path(tmp))
        registry = Registry(built.tracking_uri, built.model_name, {}, child_env(MLFLOW_TRACKING_URI=built.tracking_uri))
        # Each case once, from fresh servers: mlflow models serve 3.17 stops answering after about
        # ten 500s, and two cases here are 500s.
        with model_server(registry, f"models:/{built.model_name}/1") as v1, \
                model_server(registry, f"models:/{built.model_name}/3") as v3:
            recorded = asyncio.run(_record({"1": v1, "3": v3}))
    import mlflow

    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"mlflow_version": mlflow.__version__, "answers": recorded}, indent=1) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
