"""Dataset loaders: a registry of formats that all yield kvrag ``Instance`` lists."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from kvrag.data.demo import DEMO_PATH, DEMO_SHARED_PATH
from kvrag.data.schema import DatasetError, Instance, parse_instance, read_jsonl, read_records

Loader = Callable[[Path], list[Instance]]
LOADERS: dict[str, Loader] = {}

# Keys that mark a HELMET/KILT-style passage as gold, in the order they are looked for.
GOLD_KEYS = ("isgold", "is_gold", "gold", "has_answer")


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        if name in LOADERS:
            raise ValueError(f"dataset loader {name!r} is already registered")
        LOADERS[name] = fn
        return fn

    return wrap


@register_loader("kvrag")
def load_kvrag(path: Path) -> list[Instance]:
    return read_jsonl(path)


def _helmet_record(record: dict, lineno: int) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("ctxs"), list):
        raise ValueError("a HELMET record needs a 'ctxs' list")
    answers = record.get("answers", record.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    docs, gold = [], []
    for i, ctx in enumerate(record["ctxs"]):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise ValueError(f"ctxs[{i}] must be an object with a string 'text'")
        doc_id = str(ctx.get("id", f"ctx{i}"))
        docs.append({"id": doc_id, "title": str(ctx.get("title", "")), "text": ctx["text"]})
        if any(ctx.get(k) for k in GOLD_KEYS):
            gold.append(doc_id)
    qid = record.get("id", record.get("qid", record.get("_id", f"line{lineno}")))
    return {"id": str(qid), "question": record.get("question"), "answers": answers,
            "docs": docs, "gold_doc_ids": gold, "task": "qa"}


@register_loader("helmet")
def load_helmet(path: Path) -> list[Instance]:
    """HELMET RAG jsonl: ``question``, ``answers``, ``ctxs`` of {title, text, gold flag}.

    A passage counts as gold when any of ``GOLD_KEYS`` is truthy on it.
    """
    return read_records(path, lambda record, lineno: parse_instance(
        _helmet_record(record, lineno)))


def sniff_format(path: Path) -> str:
    """'helmet' if the first record has ``ctxs``, else 'kvrag'."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return "kvrag"  # let the strict reader report the line
                return "helmet" if isinstance(first, dict) and "ctxs" in first else "kvrag"
    return "kvrag"


BUNDLED = {"demo": DEMO_PATH, "demo-shared": DEMO_SHARED_PATH}


def dataset_path(spec: str) -> Path:
    """The file behind a bundled suite's name (``demo``, ``demo-shared``) or a path."""
    path = BUNDLED.get(spec) or Path(spec).expanduser()
    if not path.is_file():
        raise DatasetError(f"{spec}: no such dataset file (use a .jsonl path, or "
                           f"{' or '.join(map(repr, BUNDLED))})")
    return path


def fingerprint(spec: str) -> str:
    """sha256 of the dataset file, so results are never reused for changed data."""
    return hashlib.sha256(dataset_path(spec).read_bytes()).hexdigest()


def load_dataset(spec: str, fmt: str = "auto") -> list[Instance]:
    """Load a bundled suite (``demo``, ``demo-shared``) or a path, in a registered format
    or sniffed."""
    path = dataset_path(spec)
    if fmt == "auto":
        fmt = sniff_format(path)
    if fmt not in LOADERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; known: {sorted(LOADERS)}")
    return LOADERS[fmt](path)
