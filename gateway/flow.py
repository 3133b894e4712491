"""Write-side flow control shared by both ends of the proxy: the client connection (fast path) and the
upstream connection. The transport says when its buffer is full; a writer waits until the peer has
read enough, never longer than its deadline."""

from __future__ import annotations

import asyncio


class FlowControl(asyncio.Protocol):
    """An ``asyncio.Protocol`` whose writers can wait, with a deadline, for the peer to read."""

    def __init__(self) -> None:
        self._can_write = asyncio.Event()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        # Nobody will drain the buffer now: writers stop waiting (and find the connection gone).
        self._can_write.set()

    @property
    def writable(self) -> bool:
        """The transport's buffer is below its high-water mark."""
        return self._can_write.is_set()

    async def drained(self, timeout: float) -> bool:
        """Wait until the peer has taken enough of what was written; False if ``timeout`` ran out first."""
        if self._can_write.is_set():
            return True
        try:
            await asyncio.wait_for(self._can_write.wait(), max(timeout, 0.0))
        except TimeoutError:
            return False
        return True
