"""A fleet on one machine: ``kvrag serve`` workers and sglang-router in front of them.

This is the documented deployment (README, "Many servers behind sglang-router"), started
as processes for ``kvrag bench fleet`` and the fleet tests: each worker is a ``kvrag serve``
on its own loopback port with a bounded KV pool; the router is SGLang's own
(``python -m sglang_router.launch_router``). One API key serves the whole fleet: the router
checks each client's and sends it on to the workers. Everything started here is stopped
by ``stop()``, process groups included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvrag.engine_plugin import config as plugin_config
from kvrag.loopback import NotHealthyError, free_port, wait_healthy

POLICIES = ("cache_aware", "round_robin", "manual")


class FleetError(RuntimeError):
    """A worker or the router did not start."""


def call(url: str, api_key: str | None, body: dict | None = None,
         timeout_s: float = 30) -> bytes:
    """GET (or, with ``body``, POST as JSON) ``url`` with the key; the answer's bytes."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers),
                                timeout=timeout_s) as response:
        return response.read()


@dataclass
class Worker:
    url: str
    port: int
    stats: Path  # the plugin's per-request stats (KVRAG_PLUGIN_STATS)
    process: subprocess.Popen  # the ``kvrag serve`` process

    def stats_records(self) -> list[dict]:
        if not self.stats.exists():
            return []
        return [json.loads(x) for x in self.stats.read_text().splitlines() if x.strip()]

    def pool(self, api_key: str | None) -> dict[str, int]:
        """What the worker's KV pools hold now (the plugin's ``kvrag_pool``), summed over
        its data-parallel ranks."""
        info = json.loads(call(self.url + "/server_info", api_key))
        pools = [state["kvrag_pool"] for state in info["internal_states"]]
        return {k: sum(pool[k] for pool in pools) for k in pools[0]}

    def flush(self, api_key: str | None, timeout_s: float = 60) -> None:
        """Empty the radix cache (SGLang refuses while requests run: try again)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                call(self.url + "/flush_cache", api_key, {})
                return
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def kill(self) -> None:
        """SIGKILL the SGLang server behind this worker, as a machine lost would."""
        for pid in server_pids(self.port):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait(timeout=30)


def server_pids(port: int) -> list[int]:
    """Live SGLang server processes listening on ``port`` (from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "sglang.launch_server" in args and "--port" in args \
                and args[args.index("--port") + 1] == str(port):
            found.append(int(cmdline.parent.name))
    return found


@dataclass
class Fleet:
    """``workers`` ``kvrag serve`` processes; routers come and go with ``router()``."""

    model: Path
    workers: list[Worker] = field(default_factory=list)
    api_key: str | None = None
    logs: Path | None = None

    @classmethod
    def start(cls, model: Path, workers: int, logs: Path, api_key: str | None = None,
              max_total_tokens: int = 16384, mem_fraction_static: float = 0.2,
              allow_request_specs: str = "any", serve_args: tuple[str, ...] = (),
              timeout_s: float = 600) -> Fleet:
        """Start the workers one after another, each once the last answers /health: on a
        CPU, SGLang sizes a pool from the memory free when it starts, so workers started
        together may leave one of them almost nothing."""
        logs.mkdir(parents=True, exist_ok=True)
        fleet = cls(model, [], api_key, logs)
        kvrag = str(Path(sys.executable).with_name("kvrag"))
        try:
            for _ in range(workers):
                port = free_port()
                stats = logs / f"stats-{port}.jsonl"
                cmd = [kvrag, "serve", "--model", str(model), "--port", str(port),
                       "--max-total-tokens", str(max_total_tokens),
                       "--mem-fraction-static", str(mem_fraction_static),
                       "--allow-request-specs", allow_request_specs, *serve_args]
                if api_key:
                    cmd += ["--api-key", api_key]
                log = open(logs / f"worker-{port}.log", "w")  # noqa: SIM115
                process = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env=os.environ | {plugin_config.ENV_STATS: str(stats)})
                worker = Worker(f"http://127.0.0.1:{port}", port, stats, process)
                fleet.workers.append(worker)
                _wait_healthy(worker.url, process, timeout_s, logs / f"worker-{port}.log")
        except BaseException:
            fleet.stop()
            raise
        return fleet

    @contextmanager
    def router(self, policy: str = "cache_aware", workers: list[Worker] | None = None,
               extra: tuple[str, ...] = ()) -> Iterator[str]:
        """sglang-router in front of ``workers`` (default: all), on a loopback port; its
        URL. It checks each worker every 2 s and stops sending to one after 2 failures."""
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; use one of "
                             f"{', '.join(POLICIES)}")
        workers = self.workers if workers is None else workers
        port = free_port()
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
               "--port", str(port), "--policy", policy, "--log-level", "warn",
               "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
               "--worker-urls", *[w.url for w in workers], *extra]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        log_path = (self.logs or Path(".")) / f"router-{policy}-{port}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_router(url, process, len(workers), log_path)
            yield url
        finally:
            _stop_group(process)

    def stop(self) -> None:
        """SIGTERM every worker (``kvrag serve`` stops its SGLang group), then SIGKILL what
        is left of them."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=60)
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
            for pid in server_pids(worker.port):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    try:
        wait_healthy(url, process, timeout_s)
    except NotHealthyError as e:
        raise FleetError(f"{e}; its log: {log}") from None


def _wait_router(url: str, process: subprocess.Popen, workers: int, log: Path,
                 timeout_s: float = 120) -> None:
    """Until the router counts every worker (its ``/get_server_info``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FleetError(f"sglang-router exited with {process.returncode}; its log: {log}")
        try:
            info = json.loads(call(url + "/get_server_info", None))
            if info.get("workers_count") == workers:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise FleetError(f"sglang-router at {url} did not register {workers} workers in "
                     f"{timeout_s:.0f} s; its log: {log}")


def _stop_group(process: subprocess.Popen, grace_s: float = 10) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
