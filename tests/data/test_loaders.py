import json
from pathlib import Path

import pytest

from kvrag.data.loaders import load_dataset
from kvrag.data.schema import DatasetError

FIXTURE = Path(__file__).parent / "fixtures" / "helmet_rag.jsonl"


def test_helmet_fixture_maps_into_kvrag_shape() -> None:
    instances = load_dataset(str(FIXTURE))
    assert len(instances) == 2
    first = instances[0]
    assert first.question == "who wrote the novel the moonstone"
    assert first.answers == ["Wilkie Collins"]
    assert [d.title for d in first.docs][:2] == ["The Moonstone", "Wilkie Collins"]
    assert first.gold_doc_ids == ["w1"]
    assert instances[1].id == "line2" and instances[1].gold_doc_ids == ["ctx1"]


def test_helmet_bad_line_named(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    good = FIXTURE.read_text().splitlines()[0]
    path.write_text(good + "\n" + json.dumps({"question": "q", "answers": ["a"], "ctxs": [1]}))
    with pytest.raises(DatasetError, match=r"h\.jsonl:2: ctxs\[0\]"):
        load_dataset(str(path))


def test_helmet_duplicate_ids_and_bad_utf8_named(tmp_path: Path) -> None:
    good = FIXTURE.read_text().splitlines()[0]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(good + "\n" + good + "\n")
    with pytest.raises(DatasetError,
                       match=r"dup\.jsonl:2: duplicate id 'nq-1' \(first on line 1\)"):
        load_dataset(str(dup))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_dataset(str(bad))


def test_demo_and_unknown_format() -> None:
    assert len(load_dataset("demo")) >= 200
    with pytest.raises(DatasetError, match="unknown dataset format 'nosuch'"):
        load_dataset("demo", "nosuch")
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_dataset("missing.jsonl")
