"""Responses the gateway produces itself, in MLflow's error shape, and the one map from failures to them."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import HttpVersion11, web

from .upstream import NO_REPLICA, POOL_FULL, UpstreamError

# MLflow error codes (mlflow.protos.databricks_pb2.ErrorCode names), so MLflow clients can read them.
BAD_REQUEST = "BAD_REQUEST"
INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"
RESOURCE_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"
ENDPOINT_NOT_FOUND = "ENDPOINT_NOT_FOUND"
TEMPORARILY_UNAVAILABLE = "TEMPORARILY_UNAVAILABLE"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
INVALID_STATE = "INVALID_STATE"
RESOURCE_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
INTERNAL_ERROR = "INTERNAL_ERROR"


class BodyTooLarge(Exception):
    """The request body grew past the configured limit while streaming."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


def error_body(error_code: str, message: str, **extra: object) -> bytes:
    """MLflow's error shape: ``{"error_code", "message", ...}`` as JSON."""
    return json.dumps({"error_code": error_code, "message": message, **extra}).encode()


def error_response(
    status: int, error_code: str, message: str, *, headers: Mapping[str, str] | None = None, **extra: object
) -> web.Response:
    """A JSON error body ``{"error_code", "message", ...}`` with the given status."""
    return web.Response(
        status=status, body=error_body(error_code, message, **extra), content_type="application/json", headers=headers
    )


def upstream_error(exc: UpstreamError, deployment: str) -> tuple[int, bytes]:
    """502 for an unreachable or broken upstream, 504 when it ran out of time, 503 when every
    connection to it is busy (it never saw the request): status and body."""
    if exc.kind == POOL_FULL:
        return 503, error_body(TEMPORARILY_UNAVAILABLE, f"deployment {deployment!r} is at capacity: {exc}; retry shortly")
    if exc.kind == NO_REPLICA:
        return 503, error_body(TEMPORARILY_UNAVAILABLE, f"{exc}; retry shortly")
    if exc.is_timeout:
        return 504, error_body(DEADLINE_EXCEEDED, f"deployment {deployment!r}: {exc}")
    return 502, error_body(TEMPORARILY_UNAVAILABLE, f"deployment {deployment!r}: {exc}")


def upstream_error_response(exc: UpstreamError, deployment: str, headers: Mapping[str, str]) -> web.Response:
    """:func:`upstream_error` as an aiohttp response."""
    status, body = upstream_error(exc, deployment)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def body_too_large_response(limit: int, headers: Mapping[str, str] | None = None) -> web.Response:
    """413 for a body over ``max_body_bytes``."""
    return error_response(
        413, RESOURCE_EXHAUSTED, f"request body exceeds the gateway's limit of {limit} bytes", headers=headers
    )


async def not_found(request: web.Request) -> web.Response:
    """Any path the gateway does not serve."""
    return error_response(404, ENDPOINT_NOT_FOUND, f"no endpoint {request.method} {request.path}")


async def method_not_allowed(request: web.Request) -> web.Response:
    """A known path with the wrong method (scoring is POST only)."""
    return error_response(
        405, ENDPOINT_NOT_FOUND, f"{request.path} accepts POST, not {request.method}", headers={"Allow": "POST"}
    )


async def expect_handler(request: web.Request) -> None:
    """aiohttp's answer to ``Expect`` (``100 Continue`` for HTTP/1.1), with MLflow's error shape instead
    of a plain-text 417 for an expectation the gateway cannot meet."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(
            text=error_body(BAD_REQUEST, f"unknown expectation {expect!r}: only 100-continue is supported").decode(),
            content_type="application/json",
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim answer is not the response: the response's own size starts from zero.
    request.writer.output_size = 0
