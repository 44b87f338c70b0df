"""Documents a user brings to ``kvrag rag ingest``: a folder of text files or a JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from kvrag.data.schema import DatasetError, Doc

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
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or folder")
    docs, seen = [], set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                if not raw.strip():
                    continue
                rec = json.loads(raw.decode("utf-8"))
                if not isinstance(rec, dict) or not all(
                        isinstance(rec.get(k), str) for k in ("id", "text")):
                    raise ValueError("each line needs string 'id' and 'text' (and may have "
                                     "'title')")
                if rec["id"] in seen:
                    raise ValueError(f"duplicate id {rec['id']!r}")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from e
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            except ValueError as e:
                raise DatasetError(f"{path}:{lineno}: {e}") from e
            seen.add(rec["id"])
            docs.append(Doc(id=rec["id"], title=str(rec.get("title", "")), text=rec["text"]))
    if not docs:
        raise DatasetError(f"{path}: the file holds no documents")
    return docs
