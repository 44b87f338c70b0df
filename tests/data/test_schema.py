import json
from pathlib import Path

import pytest

from kvrag.data.schema import DatasetError, Doc, Instance, read_jsonl, write_jsonl


def record(**over) -> dict:
    base = {"id": "q1", "question": "Who?", "answers": ["Ann"],
            "docs": [{"id": "a", "title": "A", "text": "Ann did it."},
                     {"id": "b", "title": "B", "text": "Bob did not."}],
            "gold_doc_ids": ["a"], "task": "qa"}
    return base | over


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_trip(tmp_path: Path) -> None:
    inst = Instance(id="x", question="Q?", answers=["B"], docs=[Doc("d", "t", "text")],
                    gold_doc_ids=["d"], task="mc", choices=["yes", "no"], subset="mc")
    write_jsonl([inst], tmp_path / "d.jsonl")
    assert read_jsonl(tmp_path / "d.jsonl") == [inst]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps(record(answers=[])), "at least one answer"),
        (json.dumps(record(gold_doc_ids=["zzz"])), "not ids of any doc"),
        (json.dumps(record(task="summarize")), "'task' must be one of"),
        (json.dumps(record(task="mc", choices=["x", "y"], answers=["C"])), "choice letters"),
        (json.dumps(record(docs=[{"id": "a", "title": "A"}])), "docs[0]"),
        (json.dumps(record(colour="red")), "unknown field"),
        (json.dumps(record(id="q0")), "duplicate id 'q0'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = write_lines(tmp_path / "broken.jsonl", [
        json.dumps(record(id="q0")), json.dumps(record(id="q1")), bad_line,
        json.dumps(record(id="q3")),
    ])
    with pytest.raises(DatasetError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset file"):
        read_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no instances"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def broken():
        yield Instance(id="x", question="Q", answers=["a"], docs=[Doc("d", "t", "x")],
                       gold_doc_ids=[])
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), target)
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]
