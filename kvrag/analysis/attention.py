"""Which in-context documents the model attends to, ranked against the gold ones.

As in Molfese et al. (2026), the model reads the prompt followed by the first tokens of
the gold answer (teacher-forced). The attention that the question and those answer
tokens pay to each document's tokens, averaged over heads and query rows, is that
document's attention mass; ranking the documents by it gives NDCG@10 against the gold
documents, per layer and over all layers (the mean of the per-layer masses).

The rows' attention is recomputed from the captured queries and the cached keys, a few
rows at a time, so no seq x seq attention matrix is ever built.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvrag.data.prompt import build_prompt, format_doc
from kvrag.data.schema import Instance
from kvrag.engines import hf_attention
from kvrag.engines.chat import encode_prompt
from kvrag.evaluation.report import bootstrap_ci

K = 10
# Attention scores held at once while computing the rows' softmax (float32: 256 MiB).
MAX_SCORE_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class DocTokens:
    """A chat-templated prompt and each document's half-open token span, in prompt order."""

    input_ids: list[int]
    doc_ids: list[str]
    spans: list[tuple[int, int]]

    @property
    def docs_end(self) -> int:
        return self.spans[-1][1]


def doc_token_spans(tokenizer, instance: Instance) -> DocTokens:
    """The prompt of ``instance`` (every doc, in order) and its documents' token spans.

    The spans tile the documents' span of ``encode_prompt``; a token straddling the
    boundary of two documents belongs to the earlier one, as one straddling the start of
    the documents belongs to the header.
    """
    prompt = build_prompt(instance)
    enc = encode_prompt(tokenizer, prompt)
    text = tokenizer.apply_chat_template(prompt.messages(), add_generation_prompt=True,
                                         tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    token_starts = [a for a, _ in offsets]
    char = text.index(prompt.text) + prompt.context_span[0]
    starts = []
    for number, doc in enumerate(instance.docs, start=1):
        starts.append(bisect_left(token_starts, char))
        char += len(format_doc(number, doc))
    assert starts[0] == enc.context_start
    spans = list(zip(starts, starts[1:] + [enc.context_end], strict=True))
    return DocTokens(enc.input_ids, [d.id for d in instance.docs], spans)


def answer_ids(tokenizer, instance: Instance, n: int) -> list[int]:
    """The first ``n`` tokens of the first gold answer (an mc instance's is its letter)."""
    return tokenizer(instance.answers[0], add_special_tokens=False)["input_ids"][:n]


def key_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                  max_elements: int = MAX_SCORE_ELEMENTS) -> torch.Tensor:
    """The causal softmax attention of the last ``m`` positions over every key, averaged
    over heads and those rows: a float32 [n] that sums to 1.

    ``queries``: [q_heads, m, d] (after RoPE); ``keys``: [kv_heads, n, d]. Query head
    ``h`` reads KV head ``h // (q_heads // kv_heads)``, as transformers' ``repeat_kv``.
    """
    heads, m, dim = queries.shape
    kv_heads, n, _ = keys.shape
    q = queries.float().reshape(kv_heads, heads // kv_heads, m, dim)
    k_t = keys.float().transpose(1, 2)[:, None]  # [kv_heads, 1, d, n]
    positions = torch.arange(n, device=keys.device)
    total = torch.zeros(n, dtype=torch.float32, device=keys.device)
    step = max(1, max_elements // (heads * n))
    for r0 in range(0, m, step):
        rows = torch.arange(n - m + r0, n - m + min(m, r0 + step), device=keys.device)
        scores = (q[:, :, r0:r0 + len(rows)] @ k_t) * scaling  # [kv_heads, g, rows, n]
        scores.masked_fill_(positions[None, :] > rows[:, None], float("-inf"))
        total += scores.softmax(-1).sum((0, 1, 2))
    return total / (heads * m)


def span_sums(values: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The sum of ``values`` over each span: float32 [len(spans)]."""
    cum = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    idx = torch.tensor(spans, device=values.device)
    return (cum[idx[:, 1]] - cum[idx[:, 0]]).float()


class _Copies(dict):
    """Captured queries, copied: the hook stores views that would keep every layer's
    queries of the whole sequence alive."""

    def __setitem__(self, key: int, value: torch.Tensor) -> None:
        super().__setitem__(key, value.clone())


def attention_scaling(model) -> dict[int, float]:
    """Each layer's attention scaling, from its attention module, as transformers uses it."""
    return {m.layer_idx: float(m.scaling) for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int)
            and isinstance(getattr(m, "scaling", None), float)}


@torch.inference_mode()
def document_attention(model, ids: Sequence[int], n_rows: int,
                       spans: Sequence[tuple[int, int]],
                       max_elements: int = MAX_SCORE_ELEMENTS) -> torch.Tensor:
    """The attention mass of every span, per layer: float32 [layers, len(spans)], CPU.

    ``model`` runs kvrag's attention (``HFEngine`` loads it so); the query rows are the
    last ``n_rows`` of ``ids``.
    """
    if model.config._attn_implementation != hf_attention.NAME:
        raise ValueError(f"the model must run attn_implementation={hf_attention.NAME!r} "
                         "(HFEngine loads it so)")
    device = next(model.parameters()).device
    hooks = hf_attention.AttentionHooks(captured=_Copies(), capture_last=n_rows)
    with hf_attention.attention_hooks(hooks):
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True,
                    logits_to_keep=1)
    assert hooks.captured is not None
    cache = out.past_key_values
    scaling = attention_scaling(model)
    masses = []
    for layer, entry in enumerate(cache.layers):
        keys = entry.keys[0]
        if keys.shape[1] != len(ids):
            raise ValueError(f"layer {layer} caches {keys.shape[1]} of {len(ids)} keys (a "
                             "sliding window?); only full attention is supported")
        scale = scaling.get(layer, keys.shape[-1] ** -0.5)
        rows = key_attention(hooks.captured[layer], keys, scale, max_elements)
        masses.append(span_sums(rows, spans))
    return torch.stack(masses).cpu()


def rank_docs(doc_ids: Sequence[str], mass: Sequence[float]) -> list[str]:
    """Doc ids by decreasing mass; ties keep prompt order."""
    order = sorted(range(len(doc_ids)), key=lambda i: -mass[i])
    return [doc_ids[i] for i in order]


def ndcg_at_k(ranking: Sequence[str], gold: Collection[str], k: int = K) -> float:
    """Binary-relevance NDCG@k; the ideal ranks min(k, |gold|) gold docs first."""
    if not gold:
        raise ValueError("NDCG needs at least one gold document")
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if d in gold)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(gold))))
    return dcg / ideal


def score_masses(doc_ids: Sequence[str], gold: Collection[str],
                 mass: torch.Tensor) -> dict:
    """NDCG@10 of each layer's ranking and of the all-layer ranking (mean mass)."""
    overall = mass.mean(0).tolist()
    ranking = rank_docs(doc_ids, overall)
    return {"ndcg": ndcg_at_k(ranking, gold),
            "ndcg_by_layer": [ndcg_at_k(rank_docs(doc_ids, row), gold)
                              for row in mass.tolist()],
            "top10": ranking[:K], "doc_mass": float(sum(overall))}


def analyze_instance(model, tokenizer, instance: Instance, answer_tokens: int) -> dict:
    """One instance's record: its NDCGs, all-layer top 10 and the rows' mass on docs."""
    docs = doc_token_spans(tokenizer, instance)
    ids = docs.input_ids + answer_ids(tokenizer, instance, answer_tokens)
    n_rows = len(ids) - docs.docs_end
    mass = document_attention(model, ids, n_rows, docs.spans)
    return {"id": instance.id, "group": instance.group, "n_docs": len(docs.doc_ids),
            "gold": list(instance.gold_doc_ids), "prompt_tokens": len(docs.input_ids),
            "query_rows": n_rows, **score_masses(docs.doc_ids, set(instance.gold_doc_ids),
                                                 mass)}


def summarize_variant(records: Sequence[dict], seed: int) -> dict:
    """Mean NDCG@10, all layers and per layer, with 95% bootstrap intervals."""
    ndcg = [r["ndcg"] for r in records]
    layers = list(zip(*(r["ndcg_by_layer"] for r in records), strict=True))
    by_layer = [{"layer": i, "ndcg": float(np.mean(v)), "ci95": bootstrap_ci(v, seed)}
                for i, v in enumerate(layers)]
    best = max(by_layer, key=lambda x: x["ndcg"]) if by_layer else None
    return {"n": len(records), "ndcg": float(np.mean(ndcg)) if ndcg else None,
            "ci95": bootstrap_ci(ndcg, seed) if ndcg else None, "best_layer": best,
            "by_layer": by_layer,
            "questions": [{k: r[k] for k in ("id", "group", "ndcg", "ndcg_by_layer",
                                            "top10", "doc_mass")} for r in records]}


def paired_delta(records: Sequence[dict], base: Sequence[dict], seed: int) -> dict | None:
    """All-layer NDCG@10 minus the base model's, paired per question, with its 95% CI."""
    by_id = {r["id"]: r["ndcg"] for r in base}
    diffs = [r["ndcg"] - by_id[r["id"]] for r in records if r["id"] in by_id]
    if not diffs:
        return None
    return {"n": len(diffs), "delta": float(np.mean(diffs)), "ci95": bootstrap_ci(diffs, seed)}


def _fmt(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "–" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def render_markdown(summary: dict) -> str:
    variants = summary["variants"]
    lines = [
        "# Attention on the in-context documents: NDCG@10 against the gold documents", "",
        f"Model {summary['model']} on {summary['dataset']}, {summary['dtype']}: "
        f"{summary['questions']} questions, {summary['skipped_no_gold']} without gold "
        f"documents skipped. Query rows: the question and the first "
        f"{summary['answer_tokens']} tokens of the gold answer (teacher-forced); a document's "
        "mass is their attention on its tokens, averaged over heads and rows; all layers "
        "ranks by the mean of the layers' masses.", "",
        "| variant | n | NDCG@10 (all layers) | 95% CI | Δ vs base [95% CI] | best layer "
        "| its NDCG@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        best = v["best_layer"]
        delta = v.get("vs_base")
        delta_txt = f"{delta['delta']:+.3f} {_ci(delta['ci95'])}" if delta else "–"
        lines.append(f"| {name} | {v['n']} | {_fmt(v['ndcg'])} | {_ci(v['ci95'])} | "
                     f"{delta_txt} | {best['layer'] if best else '–'} | "
                     f"{_fmt(best['ndcg']) if best else '–'} |")
    n_layers = max((len(v["by_layer"]) for v in variants.values()), default=0)
    lines += ["", "## NDCG@10 per layer (95% CI)", "",
              "| layer | " + " | ".join(variants) + " |",
              "|---|" + "---|" * len(variants)]
    for layer in range(n_layers):
        cells = [f"{_fmt(v['by_layer'][layer]['ndcg'])} {_ci(v['by_layer'][layer]['ci95'])}"
                 if layer < len(v["by_layer"]) else "–" for v in variants.values()]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ndcg_by_layer(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, v in summary["variants"].items():
        if not v["by_layer"]:
            continue
        x = [b["layer"] for b in v["by_layer"]]
        ax.plot(x, [b["ndcg"] for b in v["by_layer"]], marker="o", markersize=3,
                label=f"{name} (n={v['n']}, all layers {_fmt(v['ndcg'])})")
        ax.fill_between(x, [b["ci95"][0] for b in v["by_layer"]],
                        [b["ci95"][1] for b in v["by_layer"]], alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_ylabel("NDCG@10 of docs ranked by attention")
    ax.set_title(f"{summary['model']} on {summary['dataset']}")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
