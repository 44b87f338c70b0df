"""Servers kvrag starts on this machine's loopback: a free port, and waiting for health."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


class NotHealthyError(RuntimeError):
    """A server that exited, or did not answer ``/health``, before its deadline."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float,
                 poll_s: float = 2.0) -> None:
    """Return once ``url``/health answers 200; ``NotHealthyError`` if ``process`` exits
    first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NotHealthyError(f"the server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll_s)
    raise NotHealthyError(f"the server for {url} did not answer /health in {timeout_s:.0f} s")
