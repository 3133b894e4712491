"""HTTP/1.1 rules both request paths share: the limits on what a client sends, the gateway's own
raw answers to a client that broke them, and one-line, rate-limited logging of such clients.

The fast path (``fastpath.py``) and aiohttp's connection handler (``aiohttp_handler.py``) apply the
same :class:`ServerLimits`, answer with :func:`own_response`, and report to one :class:`BadRequests`.
"""

from __future__ import annotations

import email.utils
import http
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httptools

from . import errors

log = logging.getLogger("gateway.bad_requests")

# aiohttp's own limit on one request or header line; the fast path hands longer lines to it.
MAX_LINE_BYTES = 8190

# Reasons a request is refused before it reaches a handler (the `reason` label of
# turnout_bad_requests_total), with the status each is answered with.
MALFORMED = "malformed"  # 400: not HTTP/1.1 as RFC 9112 writes it (bare LF, bad chunk size, ...)
HEAD_TOO_LARGE = "head_too_large"  # 431: the head is over max_head_bytes, a line over 8190 bytes
TOO_MANY_HEADERS = "too_many_headers"  # 431
HEADER_TIMEOUT = "header_timeout"  # 408: the head did not arrive in header_timeout
BODY_TIMEOUT = "body_timeout"  # 408: the body stopped arriving for client_timeout
# 415: a prediction request without Content-Type. mlflow models serve (3.17) answers it with a 500 and,
# after about ten such requests, stops answering anything (even /ping) until restarted: never forwarded.
MISSING_CONTENT_TYPE = "missing_content_type"
# Not answered: the client stopped reading its answers for client_timeout, and was disconnected.
NOT_READING = "not_reading"
REASONS = (MALFORMED, HEAD_TOO_LARGE, TOO_MANY_HEADERS, HEADER_TIMEOUT, BODY_TIMEOUT, MISSING_CONTENT_TYPE, NOT_READING)

_PHRASES = {status.value: status.phrase.encode() for status in http.HTTPStatus}


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the gateway allows a client, on every path (seconds and bytes)."""

    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    client_timeout: float = 30.0
    total_timeout: float = 120.0
    max_headers: int = 128
    max_head_bytes: int = 64 * 1024


def response_head(status: int, headers: Sequence[tuple[bytes, bytes]], length: int | None, keep_alive: bool) -> bytes:
    """Status line and headers; ``length`` None frames the body as chunked."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Unknown"))]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    if status >= 200 and status not in (204, 304):
        lines.append(b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class DateHeader:
    """The Date header of the gateway's own responses, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def __call__(self) -> tuple[bytes, bytes]:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, email.utils.formatdate(now, usegmt=True).encode()
        return (b"Date", self._value)


_JSON = (b"Content-Type", b"application/json")
_date = DateHeader()


def own_response(
    status: int, error_code: str, message: str, *, keep_alive: bool = False, headers: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A whole response the gateway writes itself, in MLflow's error shape."""
    body = errors.error_body(error_code, message)
    return response_head(status, [_JSON, _date(), *headers], len(body), keep_alive) + body


def refusal(reason: str, limits: ServerLimits, detail: str = "") -> bytes:
    """The answer (always closing the connection) to a client that broke one of the limits."""
    if reason == HEADER_TIMEOUT:
        return own_response(408, errors.DEADLINE_EXCEEDED, f"the request head did not arrive within {limits.header_timeout:g} s")
    if reason == BODY_TIMEOUT:
        return own_response(408, errors.DEADLINE_EXCEEDED, f"the request body stopped arriving for {limits.client_timeout:g} s")
    if reason == HEAD_TOO_LARGE:
        return own_response(431, errors.RESOURCE_EXHAUSTED, detail or f"the request head exceeds {limits.max_head_bytes} bytes")
    if reason == TOO_MANY_HEADERS:
        return own_response(431, errors.RESOURCE_EXHAUSTED, f"the request has more than {limits.max_headers} header fields")
    return own_response(400, errors.BAD_REQUEST, f"malformed request: {detail}" if detail else "malformed request")


class LogBudget:
    """At most ``burst`` log lines per ``period`` seconds for one kind of event; once a new period
    begins, one line says how many were not logged in the last."""

    def __init__(self, what: str, burst: int = 10, period: float = 10.0, level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self._what = what
        self._log = logger
        self._burst = burst
        self._period = period
        self._level = level
        self._clock = clock
        self._window_start = -period
        self._logged = 0
        self._suppressed = 0

    def allow(self) -> bool:
        """Whether the next line may be logged."""
        now = self._clock()
        if now - self._window_start >= self._period:
            if self._suppressed:
                self._log.log(self._level, "%d more %s were not logged in the last %.0f s", self._suppressed, self._what, self._period)
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self._burst:
            self._suppressed += 1
            return False
        self._logged += 1
        return True


class BadRequests:
    """Clients that broke the protocol or a limit: counted by reason, logged one line each at INFO,
    at most ``burst`` lines per ``period`` seconds (then one line saying how many were not logged)."""

    def __init__(self, count: Callable[[str], None] | None = None, burst: int = 10, period: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self._budget = LogBudget("bad requests", burst, period, clock=clock)

    def record(self, reason: str, peer: object, detail: str = "") -> None:
        """Count one refused request and log it unless the log is already flooded."""
        if self._count is not None:
            self._count(reason)
        if not self._budget.allow():
            return
        detail = one_line(detail)[:200]
        log.info("bad request from %s: %s%s", _peer_text(peer), reason, f" ({detail})" if detail else "")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer) if peer else "unknown"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(text: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1, IPv4-mapped forms (``::ffff:127.0.0.1``) included."""
    address = _address(text) if text else None
    return address is not None and address.is_loopback


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the right-most
    X-Forwarded-For entry that is not itself a trusted proxy (entries left of it are the client's
    own claims and prove nothing)."""
    if not trusted or peer is None:
        return peer
    hops = [peer] + [part.strip() for value in reversed(forwarded_for) for part in reversed(value.split(","))]
    for hop in hops:
        address = _address(hop)
        if address is None:
            return hop or None  # not an address: the chain cannot be followed further
        if not any(address in network for network in trusted):
            return str(address)
    return hops[-1]


class RequestHead:
    """llhttp (httptools) callbacks collecting one request head."""

    __slots__ = ("url", "headers", "done")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        """Part of the request target."""
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header field."""
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """The head is complete."""
        self.done = True


def plausible_partial_head(buf: bytes | bytearray) -> bool:
    """False when the start of a head is already malformed (bare LF or CR, a bad request line):
    aiohttp answers it at once instead of the client waiting for the header timeout."""
    try:
        httptools.HttpRequestParser(RequestHead()).feed_data(bytes(buf))
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return False
    return True
