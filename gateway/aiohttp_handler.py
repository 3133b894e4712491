"""aiohttp's connection handler held to the limits the fast path applies.

aiohttp's ``RequestHandler`` has no header-read deadline (only a keep-alive timer), no bound on a
whole head (only on each line), waits forever for a body whose chunk framing broke after it began
(the parser's error is queued behind the request that never completes), drops a client that
half-closes after a complete request, and logs every malformed request as an ERROR traceback.
This subclass closes those gaps; everything else is aiohttp's. It leans on a few of aiohttp's
private attributes (``_messages``, ``_current_request``, ``_request_in_progress``): the tests in
``tests/test_http_limits.py`` fail if a new aiohttp release moves them.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from . import errors
from .http1 import (
    HEAD_TOO_LARGE, HEADER_TIMEOUT, MALFORMED, MAX_LINE_BYTES, NOT_READING, TOO_MANY_HEADERS, BadRequests, ServerLimits, one_line,
    plausible_partial_head, refusal,
)

# Loop time at which the first byte of a request's head arrived: TURNOUT_TOTAL_TIMEOUT counts from it.
HEAD_STARTED = web.RequestKey("turnout_head_started", float)


class _HeadTooLarge(BadHttpMessage):
    """A head over ``max_head_bytes`` that aiohttp's parser, bounding only lines, accepted."""


class _Unserved(HttpProcessingError):
    """A well-formed request the gateway does not serve, which aiohttp would route or answer in plain text."""


def _unserved(message: Any) -> _Unserved | None:
    """An HTTP version other than 1.0/1.1 (aiohttp would answer ``HTTP/2.0 200`` in HTTP/1 framing), a
    transfer coding other than chunked (forwarded still encoded), or a request not for a path (``CONNECT
    host:port``, ``OPTIONS *``)."""
    # Checked per request: the parser hands out its own 1.1 and 1.0 objects, so identity is enough.
    version = message.version
    if version is not HttpVersion11 and version is not HttpVersion10:
        return _Unserved(code=505, message=f"HTTP/{version[0]}.{version[1]} is not supported; use HTTP/1.1")
    if message.chunked:
        # aiohttp takes any coding list ending in chunked as chunked, and refuses the others itself.
        coding = message.headers.get("Transfer-Encoding", "")
        if coding.strip().lower() != "chunked":
            return _Unserved(code=501, message=f"transfer coding {coding!r} is not supported; send the body chunked or with a Content-Length")
    if message.path[:1] != "/" and "://" not in message.path:
        return _Unserved(code=405, message=f"{message.method} {message.path} is not served: requests name a path")
    return None


def head_size(message: Any) -> int:
    """Bytes of a parsed request head (request line, header lines, blank line)."""
    size = len(message.method) + len(message.path) + 14
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4
    return size


def _left_over(new: list[Any], data: bytes) -> int:
    """How many bytes of ``data`` (which starts at or inside a head) follow the complete requests parsed
    from it, or 0 when that cannot be told (a chunked or unfinished body)."""
    position = 0
    for message, payload in new:
        if isinstance(message, _ErrInfo) or not payload.is_eof() or message.chunked:
            return 0
        end = data.find(b"\r\n\r\n", position)
        if end < 0:
            return 0
        # A complete body of a Content-Length request: all of it was fed to its payload.
        position = end + 4 + payload.total_bytes
    return len(data) - position


class Drain:
    """Set once the gateway stops taking requests: every answer from then on closes its connection."""

    def __init__(self) -> None:
        self.active = False


async def on_response_prepare(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """aiohttp signal (one per routed answer): ``Connection: close`` when the gateway drains or the
    client half-closed after this, its last request."""
    handler = request.protocol
    if isinstance(handler, GuardedRequestHandler) and handler.answering():
        response.force_close()
        # aiohttp has already derived its headers when this signal runs: say it in them too.
        response.headers["Connection"] = "close"


def abandon_body(request: web.BaseRequest) -> None:
    """Read no more of this request's body: the answer is written and the connection closes at once
    (instead of aiohttp lingering up to 10 s to drain a body that a stalled client is not sending)."""
    request.protocol.close()
    if not request.content.is_eof():
        request.content.feed_eof()


class GuardedRequestHandler(RequestHandler):
    """One client connection on aiohttp's path (see the module docstring for what it adds)."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, limits: ServerLimits,
                 bad_requests: BadRequests, drain: Drain, **kwargs: Any) -> None:
        super().__init__(
            manager, loop=loop, keepalive_timeout=limits.keepalive_timeout, max_headers=limits.max_headers,
            max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES, **kwargs,
        )
        self._limits = limits
        self._bad = bad_requests
        self._drain = drain
        # First byte of the head being received (None between requests), and its bytes so far.
        self._head_started: float | None = None
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        # The payload of the last request parsed: its end is where the next head begins.
        self._last_payload: StreamReader | None = None
        self._started_at: dict[int, float] = {}
        # Requests parsed and not yet answered; the client half-closed after them: close once answered.
        self._unanswered = 0
        self._client_done = False
        factory = self._request_factory
        assert factory is not None

        def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
            request = factory(message, payload, protocol, writer, task)
            started = self._started_at.pop(id(message), None) if self._started_at else None
            request[HEAD_STARTED] = loop.time() if started is None else started
            return request

        self._request_factory = make_request

    # --- the head: deadline and size -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A new connection owes its first head within the header timeout, as any other head.
        self._begin_head(self._loop.time())

    def continue_head(self, started: float) -> None:
        """The head now arriving began at ``started`` (on the fast path, before the hand-off)."""
        self._begin_head(started)
        self._check_head_soon()

    def _check_head_soon(self) -> None:
        assert self._head_started is not None
        due = self._head_started + self._limits.header_timeout
        if self._head_timer is not None and self._head_timer.when() > due:
            self._head_timer.cancel()
            self._head_timer = None
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(due, self._check_head)

    def _between_requests(self) -> bool:
        payload = self._last_payload
        return payload is None or payload.is_eof()

    def _begin_head(self, now: float) -> None:
        self._head_started = now
        self._head_bytes = 0
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(now + self._limits.header_timeout, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        started = self._head_started
        if started is None or self.transport is None:
            return
        due = started + self._limits.header_timeout
        if self._loop.time() < due:
            self._head_timer = self._loop.call_at(due, self._check_head)
            return
        if self._head_bytes == 0 and self._request_count == 0:
            # Connected and said nothing: no one to answer.
            self.force_close()
            return
        self._refuse(HEADER_TIMEOUT)

    def _refuse(self, reason: str, detail: str = "") -> None:
        """Answer a broken limit on a connection that is between requests, else close it after the current one."""
        self._head_started = None
        self._bad.record(reason, self.peername, detail)
        if self._request_in_progress or self._messages:
            # A response is being written: finish it, read nothing more, then close.
            self.close()
            return
        if self.transport is not None:
            self.transport.write(refusal(reason, self._limits, detail))
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        # Cheap on the common path: a head that arrives whole in one read is neither timed nor
        # measured here (its read is smaller than the head limit, its deadline never in question).
        in_head = self._head_started is not None
        starting = not in_head and self._between_requests()
        payload_before = self._last_payload
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            new = list(itertools.islice(self._messages, queued, None))
            self._parsed(new, payload_before, len(data))
            if in_head or starting:
                # A read that ended inside the next head (pipelined behind a complete request): that
                # head's deadline starts now, as for any other head.
                pending = _left_over(new, data)
                if pending > 0 and not self._force_close and not self._close \
                        and plausible_partial_head(data[-pending:]):
                    self._begin_head(self._loop.time())
                    self._head_bytes = pending
        elif in_head or (starting and data):
            if not in_head:
                self._begin_head(self._loop.time())
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_head_bytes:
                self._refuse(HEAD_TOO_LARGE, f"the request head exceeds {self._limits.max_head_bytes} bytes")

    def _parsed(self, new: list[Any], payload_before: StreamReader | None, read: int) -> None:
        """Requests (or a parse error) came out of this read: time them, bound their heads."""
        started = self._head_started
        self._head_started = None
        # Only a head that spanned reads, or a read larger than the limit, can be over it.
        measure = self._head_bytes + read > self._limits.max_head_bytes
        for message, payload in new:
            self._unanswered += 1
            if isinstance(message, _ErrInfo):
                if payload_before is not None and not payload_before.is_eof():
                    # The body of the request being served broke its framing. aiohttp queues the error
                    # behind that request, which then waits forever for the rest of its body: end the
                    # body with the error instead, and close the connection after the answer.
                    payload_before.set_exception(message.exc)
                    payload_before.feed_eof()
                    self._messages.remove((message, payload))
                    self._unanswered -= 1
                    self.close()
                continue
            if started is not None:
                self._started_at[id(message)] = started
                started = None  # later requests of this read began in it
            refused: HttpProcessingError | None = None
            if measure and head_size(message) > self._limits.max_head_bytes:
                refused = _HeadTooLarge(f"the request head exceeds {self._limits.max_head_bytes} bytes")
            else:
                refused = _unserved(message)
            if refused is not None:
                index = self._messages.index((message, payload))
                self._messages[index] = (_ErrInfo(status=refused.code, exc=refused, message=refused.message), EMPTY_PAYLOAD)
                payload.feed_eof()
            self._last_payload = payload

    # --- errors: one precise answer, one log line -----------------------------------------------
    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; the connection is closed instead")
        if isinstance(exc, _HeadTooLarge):
            reason, answer_status, text = HEAD_TOO_LARGE, 431, exc.message
        elif isinstance(exc, _Unserved):
            reason, answer_status, text = MALFORMED, exc.code, exc.message
            if answer_status == 405:
                # RFC 9110 §15.5.6: a 405 names what the resource allows; scoring is POST only.
                self._bad.record(reason, request.remote, str(exc.message))
                response = errors.error_response(405, errors.BAD_REQUEST, text, headers={"Allow": "POST"})
                response.force_close()
                return response
        elif isinstance(exc, LineTooLong):
            reason, answer_status, text = HEAD_TOO_LARGE, 431, f"a request line or header exceeds {MAX_LINE_BYTES} bytes"
        elif "Too many headers" in str(exc.message):
            reason, answer_status, text = TOO_MANY_HEADERS, 431, f"the request has more than {self._limits.max_headers} header fields"
        else:
            reason, answer_status, text = MALFORMED, 400, f"malformed request: {one_line(str(exc.message))}"
        self._bad.record(reason, request.remote, str(exc.message))
        code = errors.RESOURCE_EXHAUSTED if answer_status == 431 else errors.BAD_REQUEST
        response = errors.error_response(answer_status, code, text)
        response.force_close()
        return response

    # --- a client that half-closes after its requests still gets the answers -------------------
    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._unanswered and self._head_started is None and self._between_requests():
            self._client_done = True  # answer what was asked, then close
            return True
        return None

    def answering(self) -> bool:
        """An answer is about to be written: True when the connection must close after it."""
        self._unanswered -= 1
        return self._drain.active or (self._client_done and not self._unanswered)

    # --- a client that stops reading ----------------------------------------------------------
    # aiohttp waits for a full write buffer to drain without a deadline (a small answer is written
    # whole, then drained): a client that stops reading would hold the connection, and its pipelined
    # requests would wait behind it, forever. Paused longer than the client timeout: dropped.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self._limits.client_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        if self.transport is not None:
            self._bad.record(NOT_READING, self.peername, f"answers unread for {self._limits.client_timeout:g} s")
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)
