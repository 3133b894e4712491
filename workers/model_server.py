"""One ``mlflow models serve`` process group: launch, its last output lines, and a stop that leaves nothing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from .watchdog import group_alive

log = logging.getLogger(__name__)

TAIL_LINES = 40


def server_env(base: Mapping[str, str], marker: str) -> dict[str, str]:
    """The child's environment: this venv's bin first (``mlflow models serve`` execs ``uvicorn``), no telemetry."""
    env = dict(base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Lets a test (or an operator) find every process a worker started, whatever their PIDs.
    env["TURNOUT_WORKER_ID"] = marker
    return env


class PortRange:
    """Hands out ports from a range, skipping ones in use here or bound by anyone else."""

    def __init__(self, host: str, first: int, last: int) -> None:
        self.host = host
        self.first, self.last = first, last
        self._taken: set[int] = set()
        self._next = first

    @classmethod
    def parse(cls, host: str, spec: str) -> PortRange:
        """``"5001-5999"`` → a range; a single ``"5001"`` is a range of one."""
        first, _, last = spec.partition("-")
        start, end = int(first), int(last or first)
        if not 0 < start <= end <= 65535:
            raise ValueError(f"bad port range {spec!r}")
        return cls(host, start, end)

    def allocate(self) -> int:
        """A free port; raises ``RuntimeError`` when the whole range is in use."""
        size = self.last - self.first + 1
        for _ in range(size):
            port = self._next
            self._next = self.first + (self._next - self.first + 1) % size
            if port in self._taken or not self._bindable(port):
                continue
            self._taken.add(port)
            return port
        raise RuntimeError(f"no free port in {self.first}-{self.last}")

    def release(self, port: int) -> None:
        """Give a port back."""
        self._taken.discard(port)

    def _bindable(self, port: int) -> bool:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
            except OSError:
                return False
        return True


class ModelServer:
    """A running ``mlflow models serve -m URI -p PORT -h HOST --env-manager local``, in its own process group."""

    def __init__(self, model_uri: str, host: str, port: int, env: Mapping[str, str]) -> None:
        self.model_uri = model_uri
        self.host = host
        self.port = port
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._reader: asyncio.Task[None] | None = None

    @property
    def command(self) -> list[str]:
        """The command line (one uvicorn worker: scale out with more deployments, not ``-w``)."""
        mlflow = str(Path(sys.executable).parent / "mlflow")
        return [mlflow, "models", "serve", "-m", self.model_uri, "-p", str(self.port), "-h", self.host, "--env-manager", "local"]

    async def start(self) -> int:
        """Launch; returns the process group id (= the CLI's PID)."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(self.env),
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read_output(), name=f"model-server-{self.port}-output")
        return self.proc.pid

    @property
    def pgid(self) -> int | None:
        """Process group of the CLI and the uvicorn it runs."""
        return self.proc.pid if self.proc is not None else None

    @property
    def exited(self) -> bool:
        """The CLI process has ended (its uvicorn may linger until :meth:`stop`)."""
        return self.proc is not None and self.proc.returncode is not None

    async def wait_exit(self) -> int:
        """Wait for the CLI process to end; its exit status."""
        assert self.proc is not None
        return await self.proc.wait()

    def tail(self, lines: int = 12) -> str:
        """The last lines the server printed (MLflow's error when it fails to start)."""
        return "\n".join(list(self._lines)[-lines:])

    async def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._lines.append(text)
                log.debug("[%s :%d] %s", self.model_uri, self.port, text)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole group (the CLI exits at once while uvicorn drains), wait for
        every member to go, SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while group_alive(pgid) and loop.time() < deadline:
            if self.proc.returncode is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.1)
            else:
                await asyncio.sleep(0.1)
        if group_alive(pgid):
            log.warning("model server %s on :%d did not stop in %.0f s; killing it", self.model_uri, self.port, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reader, 1.0)
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
