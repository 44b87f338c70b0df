"""``kvrag train sft`` end to end on the tiny checkpoint, and its input errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvrag.cli.main import app
from kvrag.data.schema import Doc, Instance, write_jsonl


def _dataset(path, gold: bool):
    docs = [Doc(f"d{j}", f"Town {j}", f"Ana {j} was born in Town {j}.") for j in range(3)]
    write_jsonl([Instance(f"q{i}", "Where was Ana 1 born?", ["Town 1"], docs,
                          ["d1"] if gold else []) for i in range(2)], path)
    return path


def test_ids_format_without_gold_ids_fails_clearly(tmp_path, tiny_model_dir):
    data = _dataset(tmp_path / "nogold.jsonl", gold=False)
    result = CliRunner().invoke(app, ["train", "sft", "--format", "ids", "--dataset", str(data),
                                      "--model", str(tiny_model_dir), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "gold_doc_ids" in result.output and "'q0'" in result.output


@pytest.mark.slow
def test_sft_writes_a_peft_adapter(tmp_path, tiny_model_dir):
    data = _dataset(tmp_path / "gold.jsonl", gold=True)
    out = tmp_path / "adapter"
    args = ["train", "sft", "--format", "ids", "--dataset", str(data), "--model",
            str(tiny_model_dir), "--out", str(out), "--steps", "2", "--grad-accum", "1",
            "--rank", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "adapter_model.safetensors").exists()
    again = CliRunner().invoke(app, args)  # finished: resumes at the end, trains nothing
    assert again.exit_code == 0 and "resumed at step 2" in again.output
