"""``kvrag bench gpu --engine hf`` on the CPU: the same code a GPU runs, at the tiny shape
(the light-core test runs the command itself, without SGLang, LlamaIndex, Chroma or TRL)."""

from __future__ import annotations

import pytest
import torch

from kvrag.bench.gpu_hf import (
    HEADER_TOKENS,
    QUESTION_TOKENS,
    SYSTEMS,
    HFCheckSettings,
    PeakMemory,
    build_random_model,
    random_prompt,
    run_hf_check,
)
from kvrag.engines.device import resolve


def test_peak_memory_sees_a_tensor_that_lived_inside_the_block():
    with PeakMemory(torch.device("cpu")) as quiet:
        pass
    with PeakMemory(torch.device("cpu")) as busy:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert busy.bytes - quiet.bytes > 48 * 2**20
    assert "resident" in busy.source


def test_the_random_model_is_built_where_it_runs_with_the_shape_asked():
    model = build_random_model("tiny", resolve("cpu", "bfloat16"), seed=0)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (2, 2)
    again = build_random_model("tiny", resolve("cpu", "bfloat16"), seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded
    with pytest.raises(ValueError, match="llama3.1-8b, tiny"):
        build_random_model("llama-9000", resolve("cpu", "float32"), seed=0)


def test_the_random_prompt_puts_the_documents_between_header_and_question():
    enc = random_prompt(1000, vocab=500, seed=3)
    assert len(enc.input_ids) == 1000 and max(enc.input_ids) < 500
    assert enc.span == (HEADER_TOKENS, 1000 - QUESTION_TOKENS)
    assert random_prompt(1000, 500, 3).input_ids == enc.input_ids
    with pytest.raises(ValueError, match="at least"):
        random_prompt(100, 500, 3)


@pytest.mark.slow
def test_the_check_measures_every_system_and_both_training_steps(tmp_path):
    report = run_hf_check(HFCheckSettings(resolve("cpu", "float32"), "tiny", 1024, 12, 1,
                                          768), tmp_path)
    rows = {r["system"]: r for r in report["systems"]}
    assert tuple(rows) == SYSTEMS and report["ratio0_same_tokens_as_full"]
    assert rows["snapkv:0.0"]["kv_bytes"] == rows["full"]["kv_bytes"]
    # storage of the held cache: half the documents gone, then nine tenths
    assert 0.45 < rows["snapkv:0.5"]["kv_vs_full"] < 0.65
    assert rows["snapkv:0.9"]["kv_vs_full"] < rows["snapkv:0.5"]["kv_vs_full"]
    assert all(r["peak_bytes"] > r["kv_bytes"] > 0 and r["decode_tok_s"] > 0
               for r in rows.values())
    steps = report["training"]
    assert [t["prompt_tokens"] for t in steps] == [768, 768]
    assert all(t["peak_bytes"] > 0 and t["seconds"] > 0 and t["loss"] > 0 for t in steps)
    page = (tmp_path / "gpu_hf.md").read_text()
    assert "snapkv[chunk=16;heads=shared]:0.5" in page and "compression-aware" in page
    assert (tmp_path / "gpu_hf.json").is_file()


def test_the_compression_aware_step_halves_its_length_until_it_fits(monkeypatch):
    """An out-of-memory error (raised here for prompts over 600 tokens, as a GPU would)
    sends the step to half the length; the rows say which lengths did not fit."""
    import kvrag.bench.gpu_hf as gpu_hf

    real_step = gpu_hf._train_step

    def step(model, enc, spec_name, device):
        if spec_name and len(enc.input_ids) - gpu_hf.TARGET_TOKENS > 600:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(model, enc, spec_name, device)

    monkeypatch.setattr(gpu_hf, "_train_step", step)
    placement = resolve("cpu", "float32")
    model = build_random_model("tiny", placement, seed=0)
    rows = gpu_hf.bench_training(model, HFCheckSettings(placement, "tiny", train_tokens=2048),
                                 on_step=lambda label: None)
    assert [(r.prompt_tokens, r.out_of_memory_at) for r in rows] == [(2048, []),
                                                                     (512, [2048, 1024])]
    monkeypatch.setattr(gpu_hf, "SHORTEST_TRY", 1024)
    with pytest.raises(RuntimeError, match="did not fit in 80.0 GiB"):
        gpu_hf.bench_training(build_random_model("tiny", placement, seed=0),
                              HFCheckSettings(placement, "tiny", train_tokens=2048),
                              on_step=lambda label: None)
