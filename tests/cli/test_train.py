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


@pytest.mark.slow
def test_adapter_runs_in_compare_and_merges_to_a_checkpoint(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from kvrag.engines.hf import HFEngine

    data = _dataset(tmp_path / "gold.jsonl", gold=True)
    adapter = tmp_path / "adapter"
    runner = CliRunner()
    assert runner.invoke(app, ["train", "sft", "--dataset", str(data), "--model",
                               str(tiny_model_dir), "--out", str(adapter), "--steps", "1",
                               "--grad-accum", "1", "--lr", "0.05"]).exit_code == 0
    result = runner.invoke(app, ["compare", "--dataset", str(data), "--model",
                                 str(tiny_model_dir), "--adapter", str(adapter), "--systems",
                                 "full", "--out", str(tmp_path / "run"), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["adapter"] == str(adapter.resolve())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["systems"]["full"]["n"] == 2

    merged = tmp_path / "merged"
    assert runner.invoke(app, ["train", "merge", "--adapter", str(adapter), "--model",
                               str(tiny_model_dir), "--out", str(merged)]).exit_code == 0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        via_adapter = HFEngine(tiny_model_dir, adapter=adapter).model(input_ids=ids).logits
        via_merged = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert torch.allclose(via_adapter, via_merged, atol=1e-5)
    assert not torch.allclose(via_adapter, base, atol=1e-5)


def test_grpo_unknown_reward_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["train", "grpo", "--reward", "vibes", "--out",
                                      str(tmp_path / "a")])
    assert result.exit_code == 2 and "id+q" in result.output


def test_grpo_judge_needs_a_reachable_judge_url(tmp_path):
    out = str(tmp_path / "a")
    result = CliRunner().invoke(app, ["train", "grpo", "--reward", "judge", "--out", out])
    assert result.exit_code == 2 and "--judge-url" in result.output
    result = CliRunner().invoke(app, ["train", "grpo", "--reward", "judge", "--out", out,
                                      "--judge-url", "http://127.0.0.1:9/v1"])
    assert result.exit_code == 2
    assert "cannot use the judge at http://127.0.0.1:9/v1" in result.output


@pytest.mark.slow
@pytest.mark.trl
def test_grpo_writes_a_peft_adapter(tmp_path, tiny_model_dir):
    data = _dataset(tmp_path / "gold.jsonl", gold=True)
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, [
        "train", "grpo", "--reward", "id", "--dataset", str(data), "--model",
        str(tiny_model_dir), "--out", str(out), "--steps", "1", "--generations", "2",
        "--batch-size", "2", "--max-completion-tokens", "6", "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "mean reward per step" in result.output


def test_groups_select_task_families_and_an_unknown_one_is_named(tmp_path, tiny_model_dir):
    from kvrag.train.examples import demo_train_split, select_groups

    split = demo_train_split()
    picked = select_groups(split, ["multiple_choice"])
    assert picked and all(inst.task == "mc" for inst in picked)
    assert len(picked) < len(split)
    result = CliRunner().invoke(app, ["train", "grpo", "--groups", "trivia", "--model",
                                      str(tiny_model_dir), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "no instances of group(s) trivia" in result.output
    assert "multiple_choice" in result.output


@pytest.mark.parametrize("command", ["sft", pytest.param("grpo", marks=pytest.mark.trl)])
def test_cuda_without_a_cuda_device_is_refused(command, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["train", command, "--device", "cuda", "--out",
                                      str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "--device cuda: no CUDA device is visible here" in result.output
    assert not (tmp_path / "a").exists()


def test_sft_says_where_it_trains_and_checkpoints_long_prompts(tmp_path, tiny_model_dir,
                                                               monkeypatch):
    import kvrag.train.sft as sft

    seen = {}

    def fake_train(model_path, examples, cfg, out, device, **callbacks):  # records the call
        seen.update(cfg=cfg, device=device)
        raise ValueError("stopped before training")

    monkeypatch.setattr(sft, "train_sft", fake_train)
    monkeypatch.setattr(sft, "CHECKPOINTING_FROM_TOKENS", 10)
    data = _dataset(tmp_path / "gold.jsonl", gold=True)
    result = CliRunner().invoke(app, ["train", "sft", "--dataset", str(data), "--model",
                                      str(tiny_model_dir), "--out", str(tmp_path / "a"),
                                      "--device", "cpu", "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "stopped before training" in result.output
    assert "on cpu in bfloat16, gradient checkpointing" in result.output
    assert seen["cfg"].dtype == "bfloat16" and seen["cfg"].gradient_checkpointing
    assert str(seen["device"]) == "cpu"
    result = CliRunner().invoke(app, ["train", "sft", "--dataset", str(data), "--model",
                                      str(tiny_model_dir), "--out", str(tmp_path / "a"),
                                      "--compress", "snapkv:0.5"])
    assert not seen["cfg"].gradient_checkpointing  # compression-aware: never by default


@pytest.mark.slow
def test_sft_validates_on_held_out_instances_and_keeps_the_best(tmp_path, tiny_model_dir):
    data = _dataset(tmp_path / "gold.jsonl", gold=True)
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, [
        "train", "sft", "--dataset", str(data), "--model", str(tiny_model_dir), "--out",
        str(out), "--epochs", "2", "--grad-accum", "1", "--warmup-steps", "1",
        "--val-size", "1", "--eval-every", "1", "--val-max-new-tokens", "4",
        "--context-tokens", "100"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # 1 training instance (the other held out), 2 epochs of 1 example per step: 2 steps
    assert "on 1 " in text and "gold.jsonl examples" in text and ": 2 steps x 1 examples" in text
    assert "validation on 1 held-out instances every 1 steps" in text
    assert "validation score by step: 1: 0.000, 2: 0.000; kept the adapter of step 1" in text
    assert (out / "best" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--patience", "2"], "give --val-size N"),
    (["--eval-every", "2"], "give --val-size N"),
    (["--val-size", "2"], "--val-size 2 leaves nothing to train on"),
    (["--per-task", "3"], "--per-task sizes the demo split"),
])
def test_sft_validation_options_are_checked(tmp_path, tiny_model_dir, args, message):
    data = _dataset(tmp_path / "gold.jsonl", gold=True)
    result = CliRunner().invoke(app, ["train", "sft", "--dataset", str(data), "--model",
                                      str(tiny_model_dir), "--out", str(tmp_path / "a"), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


@pytest.mark.slow
def test_sft_on_a_short_demo_split(tmp_path, tiny_model_dir):
    """--context-tokens and --per-task size the demo training split: 4 families x 1."""
    from transformers import AutoTokenizer

    from kvrag.evaluation.prompt_fit import prompt_tokens
    from kvrag.train.examples import demo_train_split

    result = CliRunner().invoke(app, [
        "train", "sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"),
        "--per-task", "1", "--context-tokens", "600", "--steps", "1", "--grad-accum", "1"])
    assert result.exit_code == 0, result.output
    assert "on 4 demo examples" in " ".join(result.output.split())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    short = [prompt_tokens(tokenizer, i) for i in demo_train_split(context_tokens=600,
                                                                   per_task=1)]
    full = [prompt_tokens(tokenizer, i) for i in demo_train_split(per_task=1)]
    assert max(short) < 1000 < min(full)


@pytest.mark.parametrize(("spec", "message"), [
    ("snapkv:1.5", "0 <= RATIO < 1"),
    ("once:snapkv:0.5", "drop 'once:'"),
])
@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_untrainable_compression_is_refused(command, spec, message, tmp_path, tiny_model_dir):
    result = CliRunner().invoke(app, ["train", command, "--compress", spec, "--model",
                                      str(tiny_model_dir), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_compression_aware_grpo_on_a_short_demo_split(tmp_path, tiny_model_dir):
    out = tmp_path / "a"
    result = CliRunner().invoke(app, [
        "train", "grpo", "--model", str(tiny_model_dir), "--out", str(out), "--per-task", "1",
        "--context-tokens", "600", "--compress", "snapkv:0.5", "--steps", "1",
        "--generations", "2", "--batch-size", "2", "--max-completion-tokens", "4",
        "--rank", "4"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "on 4 demo prompts" in said and "completions from the snapkv:0.5 cache" in said
    assert json.loads((out / "train_config.json").read_text())["compress"] == "snapkv:0.5"
