"""Running pieces of Turnout side by side on one machine (the demo, ``turnout up``, tests, benchmarks):
a free port, and the processes a run left behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_with_env(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process of this machine whose environment holds ``marker``
    (``K=V``), zombies excluded; this process is never listed."""
    found = []
    needle = marker.encode()
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry.name), cmdline))
    return found
