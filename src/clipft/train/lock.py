"""One writer per run directory: RUN/.lock holds the pid, host and start time of the `clipft train`
that owns RUN, so a second process pointed at the same --out is refused instead of interleaving its
records and checkpoints with the first one's.

The lock file is created with O_EXCL (atomic on local and NFSv3+ filesystems). A lock left by a
process that died without releasing it (SIGKILL, a node crash) is taken over when its pid is gone
on this host; a lock from another host cannot be checked from here and is reported as held.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunInUseError(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """RUN/.lock for the duration of a `with` block (or `acquire` ... `release`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.held = False

    def _holder(self) -> dict | None:
        """The lock's contents; None when it vanished meanwhile; {} when unreadable."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):  # a lost race against another taker: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                if not self._stale(holder, me["host"]):
                    raise RunInUseError(self._refusal(holder))
                log.warning("%s: taking over the lock of pid %s on %s (since %s), which is no longer running",
                            self.root, holder.get("pid"), holder.get("host"), holder.get("started"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise RunInUseError(f"{self.root}: could not take the lock {self.path} (another process keeps taking it)")

    @staticmethod
    def _stale(holder: dict, host: str) -> bool:
        pid = holder.get("pid")
        if not isinstance(pid, int) or holder.get("host") != host:
            return False
        return pid != os.getpid() and not _pid_alive(pid)

    def _refusal(self, holder: dict) -> str:
        if not holder:
            return (f"{self.root}: in use (unreadable lock file {self.path}); if no run uses this directory, "
                    "delete the lock file and rerun")
        return (f"{self.root}: in use by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('started')}; wait for it to finish or use another --out")

    def release(self) -> None:
        """Remove the lock if this process still holds it (never another process's)."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
