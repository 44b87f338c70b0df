"""``kvrag bench gpu``: its checkpoint, its refusal without CUDA, and every step rehearsed
on the CPU with the same code (a tiny model of the same family instead of 8B)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvrag.bench.gpu_check import write_random_checkpoint
from kvrag.cli.main import app


def test_random_checkpoint_is_llama31_8b_shaped_and_has_no_weights(tmp_path,
                                                                  smollm2_tokenizer):
    from transformers import AutoConfig, AutoTokenizer

    smollm2_tokenizer.save_pretrained(tmp_path / "tok")
    out = write_random_checkpoint(tmp_path / "ckpt", "llama3.1-8b", tmp_path / "tok")
    config = AutoConfig.from_pretrained(out)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (32, 4096, 32, 8, 128256)
    assert config.rope_scaling["rope_type"] == "llama3" and config.max_position_embeddings == 131072
    assert config.architectures == ["LlamaForCausalLM"]
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert len(AutoTokenizer.from_pretrained(out)) == len(smollm2_tokenizer)
    with pytest.raises(ValueError, match="llama3.1-8b, tiny"):
        write_random_checkpoint(tmp_path / "x", "llama-9000", tmp_path / "tok")


def test_without_cuda_the_default_device_is_refused(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", "gpu", "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "no CUDA device is visible" in result.output
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_every_step_runs_on_the_cpu(tmp_path, tiny_model_dir):
    out = tmp_path / "gpu"
    result = CliRunner().invoke(app, [
        "bench", "gpu", "--device", "cpu", "--shape", "tiny", "--prompt-tokens", "1500",
        "--new-tokens", "8", "--repeats", "1", "--compare-model", str(tiny_model_dir),
        "--questions", "1", "--load-requests", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["base_backend"] == "torch_native" and report["prompt_tokens"] > 1500
    checks = report["checks"]
    assert checks["ratio0_same_tokens_as_inner"] and checks["none_same_tokens_as_inner"]
    assert 0.4 < checks["slots_freed_at_0.5"] < checks["slots_freed_at_0.9"] < 1
    assert [r["system"] for r in report["serving_rows"]] == [
        "torch_native", "kvrag none", "kvrag snapkv:0.0", "kvrag snapkv:0.5",
        "kvrag snapkv:0.9"]
    load = {row["system"]: row for row in report["load_rows"]}
    assert list(load) == ["torch_native full", "kvrag none", "kvrag snapkv:0.5",
                          "kvrag snapkv:0.9"]
    assert load["kvrag none"]["same_tokens_as_base"]
    assert load["kvrag snapkv:0.9"]["bound_running_requests"] == 5 > load[
        "torch_native full"]["bound_running_requests"]
    systems = report["compare"]["systems"]
    assert systems["full"]["n"] == systems["snapkv:0.5"]["n"] == 1
    assert systems["snapkv:0.5"]["kv_tokens_mean"] < systems["full"]["kv_tokens_mean"]
    assert "under load: 5 requests at once" in result.output
    assert "torch_native" in result.output and "ratio 0 gives the wrapped backend's tokens: yes" \
        in result.output
