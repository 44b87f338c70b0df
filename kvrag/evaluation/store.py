"""``results.jsonl``: one line per (question, system), flushed as it is written.

A run interrupted mid-line leaves a partial last line; opening the store drops it, so
the rerun redoes only that answer. ``run.json`` records what the results were made
with, so a rerun into the same directory with another model or dataset is refused
instead of silently mixing results. How each attempt ran (concurrency, SGLang's memory
options, the host), which cannot change a greedy answer, is appended under ``attempts``
instead of compared, so a resume may use other resources.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

ATTEMPTS = "attempts"


class StoreMismatchError(ValueError):
    """The output directory holds results made with other settings."""


class ResultStore:
    def __init__(self, out_dir: str | Path, run_config: dict,
                 attempt: dict | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "results.jsonl"
        self._check_config(run_config, attempt)
        self.records: list[dict] = self._load()

    def _check_config(self, run_config: dict, attempt: dict | None) -> None:
        config_path = self.out_dir / "run.json"
        if config_path.is_file():
            old = json.loads(config_path.read_text())
            changed = {k: (old.get(k), v) for k, v in run_config.items() if old.get(k) != v}
            if changed:
                diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise StoreMismatchError(
                    f"{self.out_dir} holds results made with other settings ({diff}); "
                    "use another --out directory"
                )
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            old = dict(run_config)
        if attempt is not None or not config_path.is_file():
            stamp = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}
            attempts = old.get(ATTEMPTS, []) + ([stamp | attempt] if attempt is not None else [])
            tmp = config_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(old | {ATTEMPTS: attempts}, indent=2) + "\n")
            tmp.replace(config_path)

    def _load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records, complete_bytes = _complete_lines(self.path.read_bytes())
        if complete_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(complete_bytes)
        return records

    def done(self) -> set[tuple[str, str]]:
        return {(r["id"], r["system"]) for r in self.records}

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


def read_results(results: Path) -> list[dict]:
    """The complete records of a ``results.jsonl``, read-only (a partial last line is left
    for the run that owns the file)."""
    return _complete_lines(results.read_bytes())[0]


def _complete_lines(raw: bytes) -> tuple[list[dict], int]:
    complete = raw[: raw.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line], len(complete)
