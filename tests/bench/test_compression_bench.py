import json

import pytest
from typer.testing import CliRunner

from kvrag.bench.compression import bench_compression
from kvrag.cli.main import app
from kvrag.compression import parse_spec
from kvrag.engines.hf import HFEngine


def test_rows_are_ratios_to_full_from_the_same_run(tiny_model_dir) -> None:
    engine = HFEngine(tiny_model_dir)
    specs = [parse_spec("snapkv:0.5"), parse_spec("retrieval:0.9")]
    n, prefill_s, rows = bench_compression(engine, specs, context_tokens=400, new_tokens=4,
                                           repeats=2)
    full, snap, retrieval = rows
    assert [r.system for r in rows] == ["full", "snapkv:0.5", "retrieval:0.9"]
    assert full.kv_tokens == n and full.kv_bytes_vs_full == 1.0
    assert full.decode_speed_vs_full == 1.0 and prefill_s > 0
    assert snap.kv_bytes_vs_full == pytest.approx(snap.kv_tokens / n) and snap.kv_tokens < n
    assert retrieval.kv_bytes_vs_full == 1.0  # keeps the whole cache
    assert snap.decode_tok_s > 0 and snap.compress_s > 0


def test_cli_prints_table_and_writes_json(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "compression", "--model", str(tiny_model_dir), "--context-tokens", "300",
        "--methods", "knorm", "--ratios", "0.5", "--new-tokens", "3", "--repeats", "1",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "knorm:0.5" in result.output and "speed/full" in result.output
    assert [r["system"] for r in json.loads(out.read_text())["rows"]] == ["full", "knorm:0.5"]


def test_cli_refuses_bad_ratio(tiny_model_dir) -> None:
    result = CliRunner().invoke(app, ["bench", "compression", "--model", str(tiny_model_dir),
                                      "--ratios", "1.2"])
    assert result.exit_code == 2 and "ratio 1.2 is out of range" in result.output
