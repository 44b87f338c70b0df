"""Attention mass on in-context documents, its NDCG@10 ranking, and `kvrag analyze attention`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvrag.analysis import attention as attn
from kvrag.analysis.attention import (
    answer_ids,
    doc_token_spans,
    document_attention,
    key_attention,
    ndcg_at_k,
    paired_delta,
    rank_docs,
    score_masses,
)
from kvrag.cli.main import app
from kvrag.data.loaders import load_dataset
from kvrag.data.prompt import build_prompt, format_doc
from kvrag.data.schema import Doc, Instance
from kvrag.engines import hf_attention
from kvrag.engines.chat import encode_prompt

runner = CliRunner()


def _peaky_model(model_dir: Path, attn_implementation: str, dtype=torch.float32):
    """The tiny model with larger query and key weights, so its attention is far from
    uniform and a wrong scaling or mask shows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation=attn_implementation, dtype=dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def mc_case(smollm2_tokenizer):
    """A demo mc instance: the prompt plus its answer letter, and the query rows."""
    instance = next(i for i in load_dataset("demo") if i.task == "mc")
    docs = doc_token_spans(smollm2_tokenizer, instance)
    ids = docs.input_ids + answer_ids(smollm2_tokenizer, instance, 8)
    return docs, ids, len(ids) - docs.docs_end


@pytest.fixture(scope="module")
def eager_reference(tiny_model_dir, mc_case):
    """Per layer and doc, the rows' attention mass from transformers' own attention maps."""
    docs, ids, n_rows = mc_case
    model = _peaky_model(tiny_model_dir, "eager")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    return torch.stack([
        torch.stack([a[0, :, -n_rows:, s:e].sum(-1).mean() for s, e in docs.spans])
        for a in out.attentions])


def test_chunked_mass_matches_eager_attention_maps(tiny_model_dir, mc_case, eager_reference,
                                                   monkeypatch):
    docs, ids, n_rows = mc_case
    model = _peaky_model(tiny_model_dir, hf_attention.NAME)
    # 5 rows per chunk: 58 query rows run in 12 chunks, the last one short
    mass = document_attention(model, ids, n_rows, docs.spans, max_elements=4 * len(ids) * 5)
    assert n_rows > 10 and mass.shape == (2, len(docs.spans))
    assert torch.allclose(mass, eager_reference, atol=1e-6, rtol=0)
    assert float(eager_reference.max() - eager_reference.min()) > 0.01  # not a flat map
    monkeypatch.setattr(attn, "attention_scaling", lambda model: {0: 0.3, 1: 0.3})
    wrong = document_attention(model, ids, n_rows, docs.spans)
    assert (wrong - eager_reference).abs().max() > 1e-3


def test_bfloat16_mass_is_computed_in_float32(tiny_model_dir, mc_case, eager_reference):
    docs, ids, n_rows = mc_case
    model = _peaky_model(tiny_model_dir, hf_attention.NAME, dtype=torch.bfloat16)
    mass = document_attention(model, ids, n_rows, docs.spans)
    assert mass.dtype == torch.float32
    assert torch.allclose(mass, eager_reference, atol=0.01, rtol=0)


def test_key_attention_matches_naive_gqa_softmax():
    torch.manual_seed(0)
    heads, kv_heads, n, m, dim = 6, 2, 40, 7, 8
    q, k = torch.randn(heads, m, dim) * 2, torch.randn(kv_heads, n, dim) * 2
    k_rep = k.repeat_interleave(heads // kv_heads, dim=0)
    scores = q @ k_rep.transpose(1, 2) * 0.4
    future = torch.arange(n)[None, :] > torch.arange(n - m, n)[:, None]
    naive = scores.masked_fill(future, float("-inf")).softmax(-1).mean((0, 1))
    for max_elements in (1, heads * n * 3, 10**9):
        got = key_attention(q, k, 0.4, max_elements)
        assert torch.allclose(got, naive, atol=1e-6)
    assert got[-m + 1:].sum() > 0 and abs(float(got.sum()) - 1) < 1e-5


def _tiling_instances() -> list[Instance]:
    tricky = Instance("t", "Which?", ["x"], [
        Doc("a", "", "Ends with spaces   "),
        Doc("b", "Café ☕", "Ünïcödé text, 東京 and emoji 🚀."),
        Doc("c", "[DOC 9] fake tag", "Text ending in a bracket ["),
        Doc("d", "Last", "x")], ["b"])
    return load_dataset("demo")[:3] + [tricky]


@pytest.mark.parametrize("instance", _tiling_instances(), ids=lambda i: i.id)
def test_doc_spans_tile_the_documents_text(smollm2_tokenizer, instance):
    docs = doc_token_spans(smollm2_tokenizer, instance)
    enc = encode_prompt(smollm2_tokenizer, build_prompt(instance))
    assert docs.input_ids == enc.input_ids
    assert docs.spans[0][0] == enc.context_start and docs.docs_end == enc.context_end
    assert all(a[1] == b[0] for a, b in zip(docs.spans, docs.spans[1:], strict=False))
    for number, (doc, (start, end)) in enumerate(zip(instance.docs, docs.spans, strict=True),
                                                 start=1):
        text = smollm2_tokenizer.decode(docs.input_ids[start:end])
        assert text == format_doc(number, doc)
    assert docs.doc_ids == [d.id for d in instance.docs]


def test_ndcg_hand_computed():
    assert ndcg_at_k(["g", "a", "b"], {"g"}) == 1.0
    assert ndcg_at_k(["a", "g", "b"], {"g"}) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(["a", "b", "g"], {"g"}) == pytest.approx(0.5)
    two = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["g1", "a", "g2"], {"g1", "g2"}) == pytest.approx(two)
    assert ndcg_at_k(["g2", "g1", "a"], {"g1", "g2"}) == 1.0
    ranking = [f"d{i}" for i in range(10)] + ["g"]
    assert ndcg_at_k(ranking, {"g"}) == 0.0
    assert ndcg_at_k(ranking[:9] + ["g"], {"g"}) == pytest.approx(1 / math.log2(11))
    many = {f"g{i}" for i in range(12)}
    assert ndcg_at_k(sorted(many), many) == 1.0  # ideal DCG over 10, not 12
    with pytest.raises(ValueError):
        ndcg_at_k(["a"], set())


def test_ranking_by_mass_per_layer_and_over_layers():
    ids = ["a", "b", "c"]
    assert rank_docs(ids, [0.1, 0.3, 0.1]) == ["b", "a", "c"]  # ties keep prompt order
    mass = torch.tensor([[0.5, 0.0, 0.4], [0.0, 0.5, 0.4]])
    scores = score_masses(ids, {"c"}, mass)
    assert scores["ndcg_by_layer"] == [pytest.approx(1 / math.log2(3))] * 2
    assert scores["ndcg"] == 1.0  # second in each layer, first by mean mass (.25, .25, .4)
    assert scores["top10"] == ["c", "a", "b"]
    assert scores["doc_mass"] == pytest.approx(0.9)


def _lora_adapter(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def _analyze(out: Path, model: Path, *extra: str):
    return runner.invoke(app, ["analyze", "attention", "--out", str(out), "--model",
                               str(model), "--limit", "3", "--device", "cpu", "--dtype",
                               "float32", *extra])


def test_cli_base_and_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = _analyze(out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    for name in ("attention.json", "attention.md", "ndcg_by_layer.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "attention.json").read_text())
    base = summary["variants"]["base"]
    assert base["n"] == 3 and len(base["by_layer"]) == 2 and summary["skipped_no_gold"] == 0
    assert 0 <= base["ndcg"] <= 1 and base["ci95"][0] <= base["ndcg"] <= base["ci95"][1]
    assert "| base | 3 |" in (out / "attention.md").read_text()

    adapter = _lora_adapter(tiny_model_dir, tmp_path / "lora")
    result = _analyze(out, tiny_model_dir, "--adapter", str(adapter))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "attention.json").read_text())
    assert list(summary["variants"]) == ["base", "lora"]
    lora = summary["variants"]["lora"]
    assert lora["adapter"] == str(adapter.resolve()) and lora["n"] == 3
    base_mass = [q["doc_mass"] for q in summary["variants"]["base"]["questions"]]
    lora_mass = [q["doc_mass"] for q in lora["questions"]]
    assert max(abs(a - b) for a, b in zip(base_mass, lora_mass, strict=True)) > 1e-4
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6  # the base model's 3 were resumed, not redone
    assert "| lora | 3 |" in (out / "attention.md").read_text()
    base_ndcg = [q["ndcg"] for q in summary["variants"]["base"]["questions"]]
    lora_ndcg = [q["ndcg"] for q in lora["questions"]]
    assert lora["vs_base"]["n"] == 3 and lora["vs_base"]["delta"] == pytest.approx(
        (sum(lora_ndcg) - sum(base_ndcg)) / 3)
    assert "vs_base" not in summary["variants"]["base"]


def test_paired_delta_pairs_by_question():
    base = [{"id": "a", "ndcg": 0.5}, {"id": "b", "ndcg": 1.0}]
    tuned = [{"id": "b", "ndcg": 0.5}, {"id": "a", "ndcg": 1.0}, {"id": "c", "ndcg": 0.0}]
    delta = paired_delta(tuned, base, seed=0)
    assert delta["n"] == 2 and delta["delta"] == 0.0
    assert delta["ci95"][0] <= 0.0 <= delta["ci95"][1]
    assert paired_delta(tuned, [], seed=0) is None


def test_cli_rejects_a_non_adapter_dir(tiny_model_dir, tmp_path):
    result = _analyze(tmp_path / "run", tiny_model_dir, "--adapter", str(tmp_path))
    assert result.exit_code == 2
    assert "not a PEFT adapter directory" in result.output
