"""Helpers for tests that start a real HTTP server (SGLang, kvrag serve) on loopback."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvrag import loopback
from kvrag.loopback import free_port  # noqa: F401  (tests import it from here)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``url``/health answers 200; fails if ``process`` exits first or time runs out."""
    try:
        loopback.wait_healthy(url, process, timeout)
    except loopback.NotHealthyError as e:
        raise AssertionError(str(e)) from None


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
