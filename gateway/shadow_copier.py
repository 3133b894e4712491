"""The shadow copier: a child process of a gateway that sends the copies the gateway hands it to the
shadow deployment, compares each answer with the active's, and reports counts back in batches.

Both pipes carry :func:`gateway.shadow.frame` messages. Standard input brings ``("copies", [("copy", ...),
...])`` (see :meth:`gateway.shadow.Shadows.offer` for the fields) and ``("discard", service)``; standard output takes
``([(key, Tally), ...], {(service, shadow): paused until})`` at most every FLUSH seconds or FLUSH_COPIES
copies, whichever comes first (the gateway frees room under its bound only when it hears a copy is done).
The end of standard input is the end of the gateway: the copier exits.

Run by the gateway as ``python -m gateway.shadow_copier CONFIG_JSON``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import deque
from typing import Any

from .proxy import Target, build_request_head
from .server import install_event_loop_policy
from .shadow import (
    DIFFER, EXAMPLE_BYTES, EXAMPLES, INCOMPARABLE, KEPT_VALUES, MAX_ANSWER, SHADOW_DOWN, SHADOW_DOWN_MAX, SHADOW_ERROR,
    TOP_FLIPS, Tally, compare, frame, read_frame,
)
from .metrics import LATENCY_BUCKETS, SHADOW_DIFFERENCE_BUCKETS, bucket_counts
from .upstream import NOTHING_SENT, Timeouts, UpstreamError, UpstreamPool

log = logging.getLogger("gateway.shadow_copier")

# Counts go back this often at most: the gateway's bound is freed by them, so they must not lag far.
FLUSH = 0.01
FLUSH_COPIES = 64

Key = tuple[str, str, str, int]


def _clip(data: bytes | None) -> str | None:
    if data is None:
        return None
    text = data[:EXAMPLE_BYTES].decode("utf-8", "replace")
    return text + ("…" if len(data) > EXAMPLE_BYTES else "")


class Copier:
    """Sends copies with a few workers, compares, and batches what it saw per shadow."""

    def __init__(self, pool: UpstreamPool, emit: Any, *, concurrency: int, timeout: float, tolerance: float,
                 keep_bodies: bool) -> None:
        self.pool = pool
        self.emit = emit
        self.concurrency = concurrency
        self.timeout = timeout
        self.tolerance = tolerance
        self.keep_bodies = keep_bodies
        self._queue: deque[tuple[Any, ...]] = deque()
        self._wake = asyncio.Event()
        self._tallies: dict[Key, Tally] = {}
        self._done = 0
        # Per shadow: (paused until, the last pause) after it refused connections; changes go to the gateway.
        self._down: dict[tuple[str, str], tuple[float, float]] = {}
        self._down_changes: dict[tuple[str, str], float] = {}
        self._targets: dict[tuple[Any, ...], Target] = {}
        self._flush: asyncio.Handle | None = None
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the workers."""
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(), name=f"copier-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        """Stop the workers; what is queued is dropped (the gateway is gone or going)."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def take(self, message: tuple[Any, ...]) -> None:
        """One message from the gateway."""
        if message[0] == "copies":
            self._queue.extend(message[1])
            self._wake.set()
        elif message[0] == "discard":
            service = message[1]
            kept: deque[tuple[Any, ...]] = deque()
            for copy in self._queue:
                if copy[1] == service:
                    self._finished(self._tally(copy), copy[-1])
                else:
                    kept.append(copy)
            self._queue = kept
        else:
            log.error("unknown message %r", message[0])

    def _tally(self, copy: tuple[Any, ...]) -> Tally:
        key = (copy[1], copy[2], copy[3], copy[4])
        found = self._tallies.get(key)
        if found is None:
            found = self._tallies[key] = Tally()
        return found

    def _finished(self, tally: Tally, size: int) -> None:
        tally.done += 1
        tally.done_bytes += size
        self._done += 1
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(FLUSH, self.flush)
        elif self._done >= FLUSH_COPIES:
            self._flush.cancel()
            self.flush()

    def flush(self) -> None:
        """Send what was counted since the last flush (histogram buckets computed here, raw values trimmed
        to what the gateway's report keeps)."""
        self._flush = None
        if not self._tallies and not self._down_changes:
            return
        for tally in self._tallies.values():
            tally.difference_counts = bucket_counts(SHADOW_DIFFERENCE_BUCKETS, tally.abs_differences)
            tally.difference_sum = sum(tally.abs_differences)
            tally.duration_counts = bucket_counts(LATENCY_BUCKETS, tally.shadow_seconds)
            tally.duration_sum = sum(tally.shadow_seconds)
            for values in (tally.abs_differences, tally.rel_differences, tally.active_seconds, tally.shadow_seconds):
                del values[:-KEPT_VALUES]
        self.emit(frame((list(self._tallies.items()), self._down_changes)))
        self._tallies = {}
        self._down_changes = {}
        self._done = 0

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            copy = self._queue.popleft()
            try:
                await self._send(copy)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("service %s: shadow copy to %s", copy[1], copy[2])
            finally:
                # Looked up afresh: a flush while the copy was out started new tallies.
                self._finished(self._tally(copy), copy[-1])

    def _target(self, where: tuple[Any, ...]) -> Target:
        found = self._targets.get(where)
        if found is None:
            if len(self._targets) > 1000:
                self._targets.clear()
            found = self._targets[where] = Target(*where)
        return found

    async def _send(self, copy: tuple[Any, ...]) -> None:
        (_, service, name, _active, _epoch, where, headers, query, remote, scheme, body,
         primary_status, primary, primary_seconds, _size) = copy
        key = (service, name)
        down = self._down.get(key)
        if down is not None and time.monotonic() < down[0]:
            self._tally(copy).dropped[SHADOW_DOWN] += 1
            return
        status: int | None = None
        answer: bytes | None = None
        elapsed: float | None = None
        if where is not None:
            target = self._target(where)
            loop = asyncio.get_running_loop()
            # The deadline on the loop's clock; the latency on a fine one (uvloop's clock counts milliseconds).
            started, began = loop.time(), time.perf_counter()
            try:
                head = build_request_head(headers, query, remote, scheme, target, len(body))
                upstream = await self.pool.request(target.host, target.port, head, body, deadline=started + self.timeout)
                try:
                    status = upstream.status
                    if upstream.small(MAX_ANSWER):
                        answer = await upstream.read()
                finally:
                    upstream.release()
                elapsed = time.perf_counter() - began
                if self._down.pop(key, None) is not None:
                    self._down_changes[key] = 0.0
            except UpstreamError as exc:
                # Broken off or timed out, even after its head: the shadow failed this copy.
                status, answer = None, None
                log.debug("service %s: shadow %s: %s", service, name, exc)
                if exc.kind in NOTHING_SENT:
                    # A dead shadow must not cost a connection attempt per request: pause, doubling.
                    pause = min(self._down.get(key, (0.0, 0.5))[1] * 2, SHADOW_DOWN_MAX)
                    until = time.monotonic() + pause
                    self._down[key] = (until, pause)
                    self._down_changes[key] = until
        comparison = compare(primary_status, primary, status, answer, self.tolerance)
        tally = self._tally(copy)
        tally.add(comparison, primary_seconds, elapsed)
        if comparison.result in (DIFFER, SHADOW_ERROR, INCOMPARABLE):
            example: dict[str, Any] = {"time": time.time(), "result": comparison.result, "shadow_status": status,
                                       "rows_differ": comparison.rows_differ}
            if self.keep_bodies:
                # Labels and bodies can be anything the model and clients send: only when bodies may be kept.
                example["flips"] = dict(comparison.flips.most_common(TOP_FLIPS))
                example.update(request=_clip(body), active_answer=_clip(primary), shadow_answer=_clip(answer))
            tally.examples.append(example)
            del tally.examples[:-EXAMPLES]


async def run(config: dict[str, Any]) -> None:
    """Copy until standard input ends."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    # Non-blocking writes: a gateway that stops reading for a while must not stall the copies.
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout.buffer)
    timeout = float(config["timeout"])
    pool = UpstreamPool(Timeouts(connect=min(float(config["connect"]), timeout), read=timeout, total=timeout),
                        keepalive=float(config["keepalive"]))
    await pool.start()
    copier = Copier(pool, out.write, concurrency=int(config["concurrency"]), timeout=timeout,
                    tolerance=float(config["tolerance"]), keep_bodies=bool(config["keep_bodies"]))
    copier.start()
    out.write(frame(([], {})))  # hello: the gateway may count on copies being read from now on
    try:
        while True:
            copier.take(await read_frame(reader))
    except asyncio.IncompleteReadError:
        pass
    finally:
        await copier.stop()
        await pool.close()
        out.close()


def main() -> None:
    """Entry point: ``python -m gateway.shadow_copier CONFIG_JSON``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_event_loop_policy()
    asyncio.run(run(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
