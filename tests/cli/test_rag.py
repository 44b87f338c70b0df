"""`kvrag rag ingest` / `kvrag rag query` on a folder of files, with the real stack."""

import re
from pathlib import Path

from typer.testing import CliRunner

from kvrag.cli.main import app

runner = CliRunner()


def test_ingest_folder_then_query(tmp_path: Path, tiny_model_dir: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "harbour.md").write_text("The harbour master of Velm is Ada Rook. " * 3)
    (docs / "bakery.txt").write_text("The bakery in Velm sells rye bread on Sundays. " * 3)
    (docs / "notes.bin").write_bytes(b"\x00\x01")  # not a text file: ignored
    common = ["--index-dir", str(tmp_path / "index"), "--model", str(tiny_model_dir),
              "--chunk-tokens", "32"]
    first = runner.invoke(app, ["rag", "ingest", str(docs), "--corpus", "velm", *common])
    assert first.exit_code == 0, first.output
    assert "2 documents" in first.output and "0 removed" in first.output
    again = runner.invoke(app, ["rag", "ingest", str(docs), "--corpus", "velm", *common])
    assert "0 chunks added" in again.output
    query = runner.invoke(app, ["rag", "query", "Who is the harbour master?", "--corpus",
                                "velm", "--budget", "40", *common])
    assert query.exit_code == 0, query.output
    assert query.output.index("harbour.md") < query.output.find("bakery.txt") or \
        "bakery.txt" not in query.output
    assert "of 40 tokens" in query.output


def test_query_unknown_corpus_and_bad_source(tmp_path: Path, tiny_model_dir: Path) -> None:
    common = ["--index-dir", str(tmp_path / "index"), "--model", str(tiny_model_dir)]
    result = runner.invoke(app, ["rag", "query", "q", "--corpus", "nope", *common])
    assert result.exit_code == 2 and "run `kvrag rag ingest` first" in result.output
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    result = runner.invoke(app, ["rag", "ingest", str(bad), "--corpus", "c", *common])
    assert result.exit_code == 2 and f"{bad}:2: duplicate id 'a'" in result.output


def test_query_with_each_retriever(tmp_path: Path, tiny_model_dir: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(
        f'{{"id": "d{i}", "title": "Town {i}", "text": "Town {i} has a mill and a bridge."}}\n'
        for i in range(6)) + '{"id": "gold", "title": "Velm", "text": "Velm exports amber '
                             'combs to the coast."}\n')
    common = ["--index-dir", str(tmp_path / "index"), "--model", str(tiny_model_dir)]
    ingest = runner.invoke(app, ["rag", "ingest", str(docs), "--corpus", "towns",
                                 "--embed-batch", "2", *common])
    assert ingest.exit_code == 0 and "7 chunks added" in ingest.output, ingest.output
    for retriever in ("dense", "bm25", "hybrid"):
        query = runner.invoke(app, ["rag", "query", "What does Velm export?", "--corpus",
                                    "towns", "--budget", "30", "--retriever", retriever,
                                    *common])
        assert query.exit_code == 0, query.output
        first = re.search(r"(\S+) \(score", query.output)
        assert first is not None and first[1].endswith("gold"), (retriever, query.output)
    bad = runner.invoke(app, ["rag", "query", "q", "--corpus", "towns", "--retriever",
                              "colbert", *common])
    assert bad.exit_code == 2 and "dense, bm25, hybrid" in bad.output


def test_a_damaged_index_is_named_with_what_to_do(tmp_path: Path, tiny_model_dir: Path) -> None:
    from chromadb.api.client import SharedSystemClient

    index = tmp_path / "index"
    common = ["--index-dir", str(index), "--model", str(tiny_model_dir)]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Some text about a mill.")
    assert runner.invoke(app, ["rag", "ingest", str(docs), "--corpus", "c", *common]
                         ).exit_code == 0
    SharedSystemClient.clear_system_cache()  # as a new process would open it
    (index / "chroma.sqlite3").write_bytes(b"not a database" * 100)
    result = runner.invoke(app, ["rag", "query", "mill", "--corpus", "c", *common])
    assert result.exit_code == 2
    assert f"the Chroma index at {index} cannot be read" in result.output
    assert "move it away or delete it" in result.output
