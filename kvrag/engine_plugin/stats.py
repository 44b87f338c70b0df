"""The plugin's stats file (``KVRAG_PLUGIN_STATS``): one JSON line per compressed request,
keyed by rid, written by the scheduler (``write``) and read by benchmarks (``StatsLog``).

The line is the request's report (``lifecycle.py``): the slots its prompt holds and their
bytes, what it kept per layer, the slots it freed, the allocator's free size before and
after, its seconds; for ``once:``, whether it built or matched the stored prefix.

The file grows for the whole life of an engine, so it is read incrementally: each lookup
parses only the lines appended since the last one.
"""

from __future__ import annotations

import json
from pathlib import Path


def write(path: str, line: dict) -> None:
    """Append ``line``; called on TP rank 0 only (every rank compresses alike)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


class StatsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._unclaimed: dict[str, dict] = {}

    def pop(self, rid: str) -> dict | None:
        """The record of request ``rid`` (each is handed out once), or None if it has none."""
        if rid not in self._unclaimed:
            self._read_new_lines()
        return self._unclaimed.pop(rid, None)

    def _read_new_lines(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            for line in f:
                if not line.endswith(b"\n"):  # the scheduler is still writing it
                    break
                self._offset += len(line)
                record = json.loads(line)
                self._unclaimed[record["rid"]] = record
