"""``turnout gateway --processes N``: one parent process supervising N gateway processes that share the
data port (and the admin port, if any) with SO_REUSEPORT.

The parent serves nothing itself. It starts each process as ``python -m gateway.processes INDEX RUN_DIR``
with the settings as one JSON line on its standard input, which then stays open: its end tells a process
that the parent is gone (even after SIGKILL), so no process outlives it. A process writes ``ready`` on
its standard output once it listens. SIGTERM and SIGINT are forwarded to every process, which drains as
a single gateway does; the parent waits for them. A process that dies otherwise is restarted after a
pause (RESTART_FIRST, doubling up to RESTART_MAX while it keeps dying young), and the death is logged.

Processes share state through Redis only (the route, the guard's counters: each flushes its own with
HINCRBY, so sums stay right), hence more than one needs Redis (see ``Settings.process_count``). Their
metrics are summed at scrape time through a private run directory (see :mod:`gateway.siblings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings
from .siblings import ProcessSlot, socket_path

log = logging.getLogger("gateway.processes")  # not __main__ when run as python -m

READY = b"ready\n"
# A process that dies is restarted after this pause, doubled per death of a process that had served for
# less than STABLE_AFTER seconds, up to RESTART_MAX: a crash loop costs little and a lone crash little time.
RESTART_FIRST = 0.5
RESTART_MAX = 10.0
STABLE_AFTER = 30.0
# Seconds the processes get beyond the shutdown timeout to exit after the forwarded signal (then SIGKILL).
EXIT_GRACE = 10.0
RUN_DIR_PREFIX = "turnout-gateway-"


class StartFailed(Exception):
    """A gateway process exited before it listened (a port taken, a bad address, ...)."""


@dataclass
class _Child:
    """One slot of the run: the process in it now, and how it fares."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    started_at: float = 0.0
    restarts: int = 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_run_dirs(base: Path) -> None:
    """Remove the run directories of parents that died without cleaning up (SIGKILL), ours only."""
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            if not entry.name.startswith(RUN_DIR_PREFIX):
                continue
            pid = entry.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
            with contextlib.suppress(OSError):
                if pid.isdigit() and entry.stat().st_uid == os.getuid() and not _pid_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)


def make_run_dir() -> Path:
    """A private directory (0700) for this run's sockets; its name carries the parent's pid."""
    base = Path(tempfile.gettempdir())
    # A unix socket's path holds at most 107 bytes: a long TMPDIR falls back to /tmp.
    if len(str(base)) > 60:
        base = Path("/tmp")
    remove_stale_run_dirs(base)
    return Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=base))


class Supervisor:
    """Starts, watches, restarts and stops the gateway processes of one run."""

    def __init__(self, settings: Settings, count: int, run_dir: Path) -> None:
        # Every process binds with SO_REUSEPORT, whatever reuse_port says: that is how they share the port.
        self.settings = settings.replace(reuse_port=True)
        self.count = count
        self.run_dir = run_dir
        self.children = [_Child(i) for i in range(count)]
        self.stopping = asyncio.Event()
        self._signal = signal.SIGTERM

    def pids(self) -> list[int]:
        """Pids of the processes running now."""
        return [c.proc.pid for c in self.children if c.proc is not None and c.proc.returncode is None]

    async def run(self) -> int:
        """Until SIGTERM/SIGINT: the exit status (0 when every process stopped by itself in time)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        keepers = [asyncio.create_task(self._keep(child), name=f"gateway-process-{child.index}")
                   for child in self.children]
        stopped = asyncio.create_task(self.stopping.wait())
        listening = asyncio.create_task(self._all_ready())
        try:
            # Every process listens, or one failed to start (its keeper raised), or a signal came first.
            await asyncio.wait([*keepers, listening, stopped], return_when=asyncio.FIRST_COMPLETED)
            _raise_failures(keepers)
            if listening.done():
                s = self.settings
                log.info("%d gateway processes listening on http://%s:%d (pids %s)", self.count, s.host, s.port,
                         " ".join(map(str, self.pids())))
            # A keeper ends only when the run stops, or by a failure nobody expected.
            await asyncio.wait([*keepers, stopped], return_when=asyncio.FIRST_COMPLETED)
            _raise_failures(keepers)
        except BaseException:
            self.stopping.set()
            self._signal = signal.SIGTERM
            self._forward()
            await self._wait_all(keepers)
            raise
        finally:
            for task in (listening, stopped):
                task.cancel()
        return await self._wait_all(keepers)

    async def _all_ready(self) -> None:
        for child in self.children:
            await child.ready.wait()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            return
        log.info("%s: stopping %d gateway processes (each drains up to %.0f s)", sig.name, self.count,
                 self.settings.shutdown_timeout)
        self._signal = sig
        self.stopping.set()
        self._forward()

    def _forward(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(self._signal)

    async def _wait_all(self, keepers: list[asyncio.Task[int]]) -> int:
        """Wait for every process to exit (SIGKILL after the drain's time and a grace); 0 when all exited 0."""
        done, pending = await asyncio.wait(keepers, timeout=self.settings.shutdown_timeout + EXIT_GRACE)
        status = 0
        if pending:
            log.error("gateway processes %s did not exit in time: killed", " ".join(map(str, self.pids())))
            status = 1
            for child in self.children:
                if child.proc is not None and child.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
            await asyncio.wait(pending)
        for task in keepers:
            if task.cancelled() or task.exception() is not None:
                status = 1
            elif task.result() not in (0, -self._signal):
                # A process still starting when the signal came dies of it: that is a clean stop too.
                status = 1
        return status

    async def _keep(self, child: _Child) -> int:
        """Run slot ``child.index`` until the run stops: its last process's exit code."""
        delay = RESTART_FIRST
        while True:
            if self.stopping.is_set():
                return 0
            code = await self._run_once(child)
            if self.stopping.is_set():
                return code
            if not child.ready.is_set():
                raise StartFailed(f"gateway process {child.index} exited with {_describe(code)} before it listened "
                                  "(see its log above)")
            lived = time.monotonic() - child.started_at
            if lived >= STABLE_AFTER:
                delay = RESTART_FIRST
            child.restarts += 1
            log.error("gateway process %d (pid %s) exited with %s after %.1f s; restarting it in %.1f s (restart %d)",
                      child.index, child.proc.pid if child.proc else "?", _describe(code), lived, delay, child.restarts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return 0
            delay = min(delay * 2, RESTART_MAX)

    async def _run_once(self, child: _Child) -> int:
        """Start one process in the slot and wait for it to exit; its socket goes with it."""
        first = child.proc is None
        proc = child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.processes", str(child.index), str(self.run_dir),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        child.started_at = time.monotonic()
        if self.stopping.is_set():
            proc.send_signal(self._signal)  # the signal came while it was being started
        assert proc.stdin is not None and proc.stdout is not None
        # The settings hold the admin token: a pipe, not the command line, carries them.
        proc.stdin.write(json.dumps(dataclasses.asdict(self.settings)).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        reader = asyncio.create_task(self._read(child, proc.stdout, announce=not first))
        try:
            code = await proc.wait()
        finally:
            # Its output ends with it (unless something it started still holds the pipe: then stop reading).
            await asyncio.wait([reader], timeout=1.0)
            reader.cancel()
            proc.stdin.close()
            with contextlib.suppress(FileNotFoundError):
                socket_path(self.run_dir, child.index).unlink()
        return code

    async def _read(self, child: _Child, stdout: asyncio.StreamReader, announce: bool) -> None:
        """The process's standard output: ``ready`` once, anything else passed on to ours."""
        while line := await stdout.readline():
            if line == READY:
                child.ready.set()
                if announce:
                    log.info("gateway process %d restarted (pid %s)", child.index, child.proc.pid if child.proc else "?")
                continue
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _raise_failures(keepers: list[asyncio.Task[int]]) -> None:
    """Raise what a keeper that ended early raised (a process that could not start)."""
    for task in keepers:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _describe(code: int) -> str:
    """``signal SIGKILL`` or ``code 3``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already. Bound without SO_REUSEPORT, so another run of
    ``--processes`` (whose processes all set it, and would share the port with ours unnoticed) shows too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


async def supervise(settings: Settings) -> int:
    """Run ``settings.process_count()`` gateway processes until SIGTERM/SIGINT; the exit status."""
    ports = [(settings.host, settings.port)]
    if settings.admin_port is not None:
        ports.append((settings.admin_host or settings.host, settings.admin_port))
    for host, port in ports:
        if port_in_use(host, port):
            log.error("%s:%d is in use (another gateway, or another run of --processes): not starting", host, port)
            return 1
    run_dir = make_run_dir()
    try:
        return await Supervisor(settings, settings.process_count(), run_dir).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# --- a gateway process ------------------------------------------------------------------------------

def _child_main(argv: list[str]) -> None:
    """``python -m gateway.processes INDEX RUN_DIR``, settings as JSON on standard input."""
    from .cli import setup_logging
    from .server import install_event_loop_policy, serve

    index, run_dir = int(argv[0]), Path(argv[1])
    line = sys.stdin.buffer.readline()
    if not line:
        return  # the parent went away before it said anything
    settings = Settings(**json.loads(line))
    setup_logging(settings.log_level, tag=f"[p{index}]")
    install_event_loop_policy()

    async def main() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_until_parent_gone(stop))

        def ready() -> None:
            os.write(sys.stdout.fileno(), READY)

        try:
            await serve(settings, slot=ProcessSlot(run_dir, index), stop=stop, on_ready=ready)
        finally:
            watcher.cancel()

    asyncio.run(main())


async def _until_parent_gone(stop: asyncio.Event) -> None:
    """Standard input ends when the parent does (even killed): then drain and exit as on SIGTERM."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while await reader.read(4096):
            pass
        if not stop.is_set():
            log.warning("the supervising parent is gone: stopping")
            stop.set()
    finally:
        transport.close()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
