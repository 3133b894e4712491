"""Kill a worker's model-server process groups when the worker dies — even by SIGKILL.

The worker starts this as ``python -m workers.watchdog`` in a session of its own and writes
``add PGID`` / ``del PGID`` lines to its stdin. When stdin reaches end-of-file — the worker closed it,
or the kernel did because the worker died — every group still listed gets SIGTERM, then SIGKILL
after a grace period. A pipe's EOF needs no polling and cannot be missed.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def group_alive(pgid: int) -> bool:
    """True while any live (non-zombie) process of the group exists.

    Zombies are skipped: an orphaned uvicorn is reaped by PID 1, which in some containers never
    happens, and a zombie holds no port and no memory.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def kill_groups(groups: set[int], grace: float) -> None:
    """SIGTERM every group, wait up to ``grace`` seconds for them to go, then SIGKILL what remains."""
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_alive(g) for g in groups):
        time.sleep(0.1)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> int:
    """Track groups from stdin until EOF, then kill whatever is still tracked."""
    grace = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    # The terminal's Ctrl-C is the worker's to handle; this process only acts on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if not value.isdigit():
            continue
        if command == "add":
            groups.add(int(value))
        elif command == "del":
            groups.discard(int(value))
    if groups:
        kill_groups(groups, grace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
