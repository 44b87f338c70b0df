import json
from pathlib import Path

import pytest

from kvrag.evaluation.store import ResultStore, StoreMismatchError

CONFIG = {"model": "m", "engine": "hf", "dataset": "demo", "max_new_tokens": 8}


def test_append_reload_and_done(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, CONFIG)
    store.append({"id": "q1", "system": "full", "x": 1})
    again = ResultStore(tmp_path, CONFIG)
    assert again.done() == {("q1", "full")}
    assert again.records == [{"id": "q1", "system": "full", "x": 1}]


def test_partial_last_line_is_dropped_and_next_append_is_clean(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, CONFIG)
    store.append({"id": "q1", "system": "full"})
    with store.path.open("a") as f:
        f.write('{"id": "q2", "sys')  # killed mid-write
    store = ResultStore(tmp_path, CONFIG)
    assert store.done() == {("q1", "full")}
    store.append({"id": "q2", "system": "full"})
    lines = store.path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["q1", "q2"]


def test_other_settings_are_refused(tmp_path: Path) -> None:
    ResultStore(tmp_path, CONFIG)
    with pytest.raises(StoreMismatchError, match="model: 'm' -> 'other'"):
        ResultStore(tmp_path, CONFIG | {"model": "other"})


def test_every_changed_setting_is_listed(tmp_path: Path) -> None:
    ResultStore(tmp_path, CONFIG | {"chunk_tokens": 128, "rag_order": "score"})
    with pytest.raises(StoreMismatchError, match="max_new_tokens: 8 -> 64; chunk_tokens: "
                                                 "128 -> 64; rag_order: 'score' -> 'document'"):
        ResultStore(tmp_path, CONFIG | {"max_new_tokens": 64, "chunk_tokens": 64,
                                        "rag_order": "document"})


def test_each_attempt_is_recorded_and_may_differ(tmp_path: Path) -> None:
    ResultStore(tmp_path, CONFIG, {"concurrency": 16})
    ResultStore(tmp_path, CONFIG, {"concurrency": 1, "sglang": {"max_total_tokens": 8192}})
    saved = json.loads((tmp_path / "run.json").read_text())
    assert {k: saved[k] for k in CONFIG} == CONFIG
    assert [a["concurrency"] for a in saved["attempts"]] == [16, 1]
    assert saved["attempts"][1]["sglang"] == {"max_total_tokens": 8192}
    assert all(a["started"] and a["host"] for a in saved["attempts"])
