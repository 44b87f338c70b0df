import json

from typer.testing import CliRunner

from kvrag.cli.main import app


def test_rag_bench_grows_one_corpus_per_store(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "rag.json"
    result = CliRunner().invoke(app, [
        "bench", "rag", "--corpus-chunks", "40,120", "--questions", "3", "--budget", "200",
        "--chunk-tokens", "64", "--embed-batch", "16", "--model", str(tiny_model_dir),
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["store"], r["chunks"]) for r in rows] == [
        ("embedded", 40), ("embedded", 120), ("server", 40), ("server", 120)]
    assert all(r["ingest_chunks_per_s"] > 0 and r["retrieval_median_ms"] > 0
               and r["retrieval_p95_ms"] >= r["retrieval_median_ms"] and r["questions"] == 3
               for r in rows)
    assert "median vs smallest" in result.output and "1.00x" in result.output


def test_rag_bench_refuses_sizes_that_do_not_grow(tiny_model_dir) -> None:
    result = CliRunner().invoke(app, ["bench", "rag", "--corpus-chunks", "100,50",
                                      "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "increasing" in result.output
    result = CliRunner().invoke(app, ["bench", "rag", "--stores", "cloud",
                                      "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "embedded, server" in result.output
