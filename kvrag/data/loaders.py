"""Loading a dataset: every registered format (kvrag's own, HELMET, the public benchmarks),
the format sniffed from the content, bundled suites by name, fingerprints and shared corpora."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kvrag.data import public_formats
from kvrag.data.demo import DEMO_PATH, DEMO_SHARED_PATH
from kvrag.data.needles import NEEDLES_PATH
from kvrag.data.registry import LOADERS, register_loader
from kvrag.data.schema import DatasetError, Doc, Instance, parse_instance, read_jsonl, read_records
from kvrag.data.sources import read_docs

# Keys that mark a HELMET/KILT-style passage as gold, in the order they are looked for.
GOLD_KEYS = ("isgold", "is_gold", "gold", "has_answer")


@register_loader("kvrag")
def load_kvrag(path: Path) -> list[Instance]:
    return read_jsonl(path)


def _ctx_ids(ctxs: list) -> list[str]:
    """The passages' own ``id``s when every passage has one and they are unique, else
    positional ``ctx0``, ``ctx1``, ... (a gold passage retrieved twice would otherwise
    make ids clash)."""
    ids = [str(ctx["id"]) for ctx in ctxs if isinstance(ctx, dict) and "id" in ctx]
    if len(ids) == len(ctxs) and len(set(ids)) == len(ids):
        return ids
    return [f"ctx{i}" for i in range(len(ctxs))]


def _helmet_record(record: dict, lineno: int) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("ctxs"), list):
        raise ValueError("a HELMET record needs a 'ctxs' list")
    answers = record.get("answers", record.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    docs, gold = [], []
    for i, (ctx, doc_id) in enumerate(zip(record["ctxs"], _ctx_ids(record["ctxs"]),
                                          strict=True)):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise ValueError(f"ctxs[{i}] must be an object with a string 'text'")
        docs.append({"id": doc_id, "title": str(ctx.get("title", "")), "text": ctx["text"]})
        if any(ctx.get(k) for k in GOLD_KEYS):
            gold.append(doc_id)
    qid = record.get("id", record.get("qid", record.get("_id", f"line{lineno}")))
    return {"id": str(qid), "question": record.get("question"), "answers": answers,
            "docs": docs, "gold_doc_ids": gold, "task": "qa"}


@register_loader("helmet")
def load_helmet(path: Path) -> list[Instance]:
    """HELMET RAG jsonl (``data/kilt/*.jsonl``): ``question``, ``answers``, ``ctxs`` of
    {title, text, has_answer}, as HELMET's data.py ``load_qa`` reads them.

    A passage counts as gold when any of ``GOLD_KEYS`` is truthy on it (HELMET's own flag
    is ``has_answer``: the passage contains an answer string). The id is ``id`` (PopQA),
    ``qid`` or ``_id``, else ``line<n>`` (NQ, TriviaQA, HotpotQA have none). Other fields
    (``hard_negative_ctxs``, PopQA's entity fields) are ignored; HELMET's ``.json``
    variant (``{"data": [...]}``) is not read.
    """
    return read_records(path, lambda record, lineno: parse_instance(
        _helmet_record(record, lineno)))


def _first_line(path: Path) -> object:
    """The first non-blank line, decoded; None if there is none or it is not JSON."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None  # let the strict reader report the line
    return None


def _first_array_item(path: Path, limit: int = 1 << 26) -> object:
    """The first element of a JSON array file, decoding no more of the file than it
    needs (up to ``limit`` bytes); None if it cannot be decoded."""
    decoder = json.JSONDecoder()
    with path.open("rb") as f:
        data, size = b"", 1 << 16
        while True:
            chunk = f.read(size - len(data))
            data += chunk
            text = data.decode("utf-8", errors="ignore").lstrip()[1:].lstrip()
            try:
                return decoder.raw_decode(text)[0]
            except json.JSONDecodeError:
                if not chunk or size >= limit:
                    return None
                size *= 2


def _first_char(path: Path) -> bytes:
    with path.open("rb") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


def sniff_format(path: Path) -> str:
    """Guess a dataset's format from its content.

    A directory -> 'loft'; a JSON array whose first item has ``choice_A`` ->
    'longbench-v2'; JSONL whose first record has ``context``, ``input`` and ``options``
    -> 'infinitebench', ``ctxs`` -> 'helmet', ``qid`` and ``query_text`` with a
    ``corpus.jsonl`` beside the file -> 'loft'; anything else -> 'kvrag' (whose strict
    reader then says what is wrong).
    """
    if path.is_dir():
        return "loft"
    if _first_char(path) == b"[":
        first = _first_array_item(path)
        return "longbench-v2" if isinstance(first, dict) and "choice_A" in first else "kvrag"
    first = _first_line(path)
    if not isinstance(first, dict):
        return "kvrag"
    if {"context", "input", "options"} <= first.keys():
        return "infinitebench"
    if "ctxs" in first:
        return "helmet"
    if {"qid", "query_text"} <= first.keys() and (path.parent / "corpus.jsonl").is_file():
        return "loft"
    return "kvrag"


BUNDLED = {"demo": DEMO_PATH, "demo-shared": DEMO_SHARED_PATH, "needles": NEEDLES_PATH}


def dataset_path(spec: str) -> Path:
    """The file behind a bundled suite's name (``demo``, ``demo-shared``, ``needles``) or a
    path: a file, or a directory (a LOFT set)."""
    path = BUNDLED.get(spec) or Path(spec).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise DatasetError(f"{spec}: no such dataset file or directory (use a .jsonl path, "
                           f"a LOFT directory, or {' or '.join(map(repr, BUNDLED))})")
    return path


CORPUS_SUFFIX = ".corpus.jsonl"


def corpus_path(spec: str) -> Path | None:
    """The shared corpus beside a dataset file (``X.corpus.jsonl`` for ``X.jsonl``, as
    ``kvrag data build`` writes it), or None."""
    path = dataset_path(spec)
    if path.is_dir():
        return None
    sidecar = path.with_name(path.name.removesuffix(".jsonl") + CORPUS_SUFFIX)
    return sidecar if sidecar.is_file() else None


def load_corpus(spec: str) -> tuple[Doc, ...] | None:
    """The dataset's shared corpus (passages as docs) that RAG retrieves from, or None
    where it has none: a built set's ``X.corpus.jsonl``, or a LOFT set's corpus, which its
    instances hold too until --fit-context trims them."""
    path = dataset_path(spec)
    if sniff_format(path) == "loft":
        return public_formats.loft_corpus(path)
    sidecar = corpus_path(spec)
    return None if sidecar is None else tuple(read_docs(sidecar))


def fingerprint(spec: str) -> str:
    """sha256 of the dataset file (and its shared corpus, if any), so results are never
    reused for changed data. For a LOFT set (a directory, or a queries file with
    corpus.jsonl beside it), of the queries and corpus files it reads. Each part but a
    lone dataset file is prefixed by its name and size."""
    path = dataset_path(spec)
    fmt = sniff_format(path)
    sidecar = corpus_path(spec)
    if fmt != "loft" and sidecar is None:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for part in public_formats.loft_files(path) if fmt == "loft" else [path, sidecar]:
        digest.update(f"{part.name}\0{part.stat().st_size}\0".encode())
        with part.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_dataset(spec: str, fmt: str = "auto") -> list[Instance]:
    """Load a bundled suite (``demo``, ``demo-shared``) or a path, in a registered format
    or sniffed."""
    path = dataset_path(spec)
    if fmt == "auto":
        fmt = sniff_format(path)
    if fmt not in LOADERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; known: {sorted(LOADERS)}")
    return LOADERS[fmt](path)
