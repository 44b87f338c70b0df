"""Documents from a folder of text files or a JSONL: what ``kvrag rag ingest`` and
``kvrag data build`` read, and a built set's shared corpus."""

from __future__ import annotations

from pathlib import Path

from kvrag.data.schema import DatasetError, Doc, read_records

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")


def read_docs(source: str | Path) -> list[Doc]:
    """A folder's text/markdown files (id: relative path, title: file stem), or a JSONL
    file with one ``{"id", "title", "text"}`` object per line."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DatasetError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
        docs = []
        for f in files:
            try:
                docs.append(Doc(id=str(f.relative_to(path)), title=f.stem,
                                text=f.read_text(encoding="utf-8")))
            except UnicodeDecodeError as e:
                raise DatasetError(f"{f}: not valid UTF-8 ({e.reason})") from e
        return docs
    return read_records(path, _doc)


def _doc(record: object, lineno: int) -> Doc:
    if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("id", "text")):
        raise ValueError("each line needs string 'id' and 'text' (and may have 'title')")
    return Doc(id=record["id"], title=str(record.get("title", "")), text=record["text"])
