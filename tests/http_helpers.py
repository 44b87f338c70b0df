"""Helpers for tests that start a real HTTP server (SGLang, kvrag serve) on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``url``/health answers 200; fails if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"server at {url} not healthy after {timeout} s")


@contextmanager
def chat_stub(model: str, reply: str,
              api_key: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """A loopback server speaking the OpenAI chat protocol: it lists ``model`` and answers
    every chat completion with ``reply``; with ``api_key``, as ``kvrag serve --api-key``, a
    request without ``Authorization: Bearer API_KEY`` gets 401. Yields its /v1 URL and the
    bodies it received."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self._authorized():
                self._reply({"data": [{"id": model}]})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self._authorized():
                seen.append(body)
                self._reply({"choices": [{"message": {"content": reply}}]})

        def _authorized(self) -> bool:
            if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self._reply({"error": "Unauthorized"}, status=401)
            return False

        def _reply(self, body: dict, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()
