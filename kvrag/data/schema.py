"""kvrag's instance format with strict, line-numbered validation.

One JSON object per line:
``{"id", "question", "answers": [str], "docs": [{"id", "title", "text"}],
"gold_doc_ids": [str], "choices": [str] (mc only), "task": "qa"|"mc"|"sum"}``
plus the optional ``"subset"`` (a task family name used to group scores) and
``"provenance"`` (an object saying how the instance was built, kept as is). For ``sum``
(summarisation) the answers are reference summaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

TASKS = ("qa", "mc", "sum")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Instance:
    id: str
    question: str
    answers: list[str]
    docs: list[Doc]
    gold_doc_ids: list[str]
    task: str = "qa"
    choices: list[str] = field(default_factory=list)
    subset: str = ""
    provenance: dict = field(default_factory=dict, compare=False)

    @property
    def group(self) -> str:
        """The name scores are grouped under: the subset if given, else the task."""
        return self.subset or self.task

    @cached_property
    def corpus_id(self) -> str:
        """A hash of the documents (ids, titles, texts, in order): instances with the same
        document list share a corpus, and so can share its cache (compress-once)."""
        return docs_digest(self.docs)

    def to_json(self) -> dict:
        record = asdict(self)
        if not self.choices:
            del record["choices"]
        if not self.subset:
            del record["subset"]
        if not self.provenance:
            del record["provenance"]
        return record


# Digests of shared corpora, held as tuples (which cannot change) by the loaders that share
# one corpus among many questions; keyed by identity, holding the tuple so its id stays.
_SHARED_DIGESTS: dict[int, tuple[tuple[Doc, ...], str]] = {}


def docs_digest(docs: Iterable[Doc]) -> str:
    """A short content hash of a document list (ids, titles, texts, in order); computed
    once for a shared corpus (a tuple)."""
    if isinstance(docs, tuple) and id(docs) in _SHARED_DIGESTS:
        return _SHARED_DIGESTS[id(docs)][1]
    text = json.dumps([[d.id, d.title, d.text] for d in docs], ensure_ascii=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if isinstance(docs, tuple):
        _SHARED_DIGESTS[id(docs)] = (docs, digest)
    return digest


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _str_list(record: dict, key: str) -> list[str]:
    value = record.get(key)
    _require(
        isinstance(value, list) and all(isinstance(v, str) for v in value),
        f"'{key}' must be a list of strings",
    )
    return list(value)


def parse_instance(record: object) -> Instance:
    """Validate one decoded JSON record; raises ValueError saying what is wrong."""
    _require(isinstance(record, dict), "each line must be a JSON object")
    assert isinstance(record, dict)
    known = {"id", "question", "answers", "docs", "gold_doc_ids", "choices", "task", "subset",
             "provenance"}
    unknown = sorted(set(record) - known)
    _require(not unknown, f"unknown field(s) {unknown}; allowed: {sorted(known)}")
    for key in ("id", "question"):
        _require(isinstance(record.get(key), str) and record[key].strip() != "",
                 f"'{key}' must be a non-empty string")
    answers = _str_list(record, "answers")
    _require(len(answers) > 0, "'answers' must hold at least one answer")
    raw_docs = record.get("docs")
    _require(isinstance(raw_docs, list) and len(raw_docs) > 0, "'docs' must be a non-empty list")
    docs = []
    for i, d in enumerate(raw_docs):
        _require(
            isinstance(d, dict)
            and all(isinstance(d.get(k), str) for k in ("id", "title", "text")),
            f"docs[{i}] must be an object with string 'id', 'title' and 'text'",
        )
        docs.append(Doc(id=d["id"], title=d["title"], text=d["text"]))
    doc_ids = [d.id for d in docs]
    _require(len(set(doc_ids)) == len(doc_ids), "doc ids must be unique within an instance")
    gold = _str_list(record, "gold_doc_ids") if "gold_doc_ids" in record else []
    known = set(doc_ids)
    missing = [g for g in gold if g not in known]
    _require(not missing, f"gold_doc_ids {missing} are not ids of any doc")
    task = record.get("task", "qa")
    _require(task in TASKS, f"'task' must be one of {list(TASKS)}, got {task!r}")
    choices = _str_list(record, "choices") if "choices" in record else []
    if task == "mc":
        _require(2 <= len(choices) <= len(LETTERS), "an mc instance needs 2-26 'choices'")
        valid = set(LETTERS[: len(choices)])
        _require(all(a in valid for a in answers),
                 f"mc 'answers' must be choice letters among {sorted(valid)}")
    subset = record.get("subset", "")
    _require(isinstance(subset, str), "'subset' must be a string")
    provenance = record.get("provenance", {})
    _require(isinstance(provenance, dict), "'provenance' must be an object")
    return Instance(
        id=record["id"], question=record["question"], answers=answers, docs=docs,
        gold_doc_ids=gold, task=task, choices=choices, subset=subset, provenance=provenance,
    )


Item = TypeVar("Item", Instance, Doc)


def read_records(path: str | Path, to_item: Callable[[object, int], Item]) -> list[Item]:
    """Decode and validate every line of a JSONL file before returning anything.

    ``to_item(record, lineno)`` turns one decoded line into an item with an ``id`` (an
    Instance, a Doc) or raises ValueError. Raises DatasetError naming the file and 1-based
    line of the first bad line (invalid UTF-8 or JSON, an invalid record, or an id seen on
    an earlier line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    instances: list[Item] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                inst = to_item(json.loads(line), lineno)
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from e
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            except ValueError as e:
                raise DatasetError(f"{path}:{lineno}: {e}") from e
            if inst.id in seen:
                raise DatasetError(
                    f"{path}:{lineno}: duplicate id {inst.id!r} (first on line {seen[inst.id]})"
                )
            seen[inst.id] = lineno
            instances.append(inst)
    if not instances:
        raise DatasetError(f"{path}: the file holds no instances")
    return instances


def read_jsonl(path: str | Path) -> list[Instance]:
    """kvrag's own format, strictly validated (see ``read_records``)."""
    return read_records(path, lambda record, lineno: parse_instance(record))


def write_jsonl(instances: Iterable[Instance], path: str | Path) -> None:
    """Write atomically: the file is either complete or untouched."""
    _write_lines((inst.to_json() for inst in instances), Path(path))


def write_docs(docs: Iterable[Doc], path: str | Path) -> None:
    """Documents as ``{id, title, text}`` lines, written atomically."""
    _write_lines((asdict(doc) for doc in docs), Path(path))


def _write_lines(records: Iterable[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
