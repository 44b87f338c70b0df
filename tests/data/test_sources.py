import json

import pytest

from kvrag.data.schema import DatasetError, Doc
from kvrag.data.sources import read_docs


def test_a_folder_gives_its_text_files_by_relative_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# B")
    (tmp_path / "sub" / "a.txt").write_text("alpha")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert read_docs(tmp_path) == [Doc("b.md", "b", "# B"), Doc("sub/a.txt", "a", "alpha")]


def test_a_jsonl_gives_one_doc_per_line_title_optional(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "1", "title": "One", "text": "x"}) + "\n"
                    + json.dumps({"id": "2", "text": "y"}) + "\n")
    assert read_docs(path) == [Doc("1", "One", "x"), Doc("2", "", "y")]


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(DatasetError, match="no .txt/.md/.markdown/.rst files in this folder"):
        read_docs(tmp_path)
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "1"}\n')
    with pytest.raises(DatasetError, match=r"docs.jsonl:1: each line needs string 'id' and "):
        read_docs(path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DatasetError, match="latin1.txt: not valid UTF-8"):
        read_docs(tmp_path)
