"""One live run per output directory: an advisory lock on ``DIR/run.lock``.

The lock is ``flock``'s, so the kernel drops it when its holder exits, however it exits:
a lock file left by a killed run never blocks the resume. The file names the holder
(pid, host, start time) for the error the next run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process is writing into the same output directory."""


class RunLock:
    """``with RunLock(out_dir):`` holds ``out_dir`` for this process, or raises at once."""

    def __init__(self, out_dir: str | Path, command: str = "kvrag compare") -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.command = command
        self._file = None

    def __enter__(self) -> RunLock:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+", encoding="utf-8")  # never truncate before holding it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise RunLockedError(
                f"{self.out_dir} is in use by another run ({holder}); wait for it to finish "
                "or use another --out directory") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": self.command,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._file is not None
        self._file.truncate(0)
        self._file.close()  # closing releases the lock
        self._file = None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return (f"{holder['command']}, pid {holder['pid']} on {holder['host']}, "
                f"started {holder['started']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"
