"""Summaries of a comparison: ``summary.json``, ``summary.md`` and the accuracy-vs-KV plot.

Intervals are percentile bootstraps over questions (seeded); ``vs_full`` resamples the
paired per-question differences against ``full`` on the questions both answered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvrag.evaluation.metrics import TASK_METRICS, task_score

METRICS = ("subem", "subem_output", "em", "f1", "accuracy", "rouge_l", "judge")
METRIC_NAMES = {"subem": "SubEM", "subem_output": "SubEM out", "em": "EM", "f1": "F1",
                "accuracy": "accuracy", "rouge_l": "ROUGE-L", "judge": "judge"}
N_BOOTSTRAP = 2000


def bootstrap_ci(values: Sequence[float], seed: int) -> list[float]:
    """95% percentile interval of the mean."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(N_BOOTSTRAP, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _metric_values(records: Sequence[dict], metric: str) -> list[float]:
    return [r["scores"][metric] for r in records if r["scores"].get(metric) is not None]


def _system_summary(records: list[dict], full: dict[str, dict] | None, seed: int,
                    at_once: int | None = None) -> dict:
    out: dict = {"n": len(records)}
    ci: dict[str, list[float]] = {}
    for metric in METRICS:
        values = _metric_values(records, metric)
        out[metric] = _mean(values)
        if values:
            ci[metric] = bootstrap_ci(values, seed)
    scored = [v for r in records if (v := task_score(r)) is not None]
    out["score"] = _mean(scored)  # each answer under its task's metric
    if scored:
        ci["score"] = bootstrap_ci(scored, seed)
    recalls = [r["doc_recall"] for r in records if r.get("doc_recall") is not None]
    out["doc_recall"] = _mean(recalls)
    out["truncated"] = _mean([float(r["truncated"]) for r in records if "truncated" in r])
    for key in ("cite_precision", "cite_recall"):
        out[key] = _mean(_metric_values(records, key))
    for key in ("kv_tokens", "attended_tokens", "layer_mean_kv_tokens", "kv_bytes",
                "prompt_tokens", "prefill_tokens", "latency_s", "prefill_s", "compress_s",
                "decode_s", "recalled_tokens", "recall_s", "host_kv_bytes"):
        out[f"{key}_mean"] = _mean([r["cost"][key] for r in records
                                    if r["cost"].get(key) is not None])
    peaks = [r["cost"]["peak_bytes"] for r in records if r["cost"].get("peak_bytes")]
    out["peak_bytes_max"] = max(peaks) if peaks else None
    out["served_uncompressed"] = sum(bool(r["cost"].get("served_uncompressed"))
                                     for r in records)
    out["kv_tokens_per_corpus"] = kv_tokens_per_corpus(records, at_once)
    out["ci95"] = ci
    if full is not None:
        same = [float(_same_answer(r, full[r["id"]])) for r in records if r["id"] in full]
        out["same_as_full"] = _mean(same)
        if same:
            ci["same_as_full"] = bootstrap_ci(same, seed)
        out["vs_full"] = {}
        for metric in METRICS:
            pairs = [(r["scores"][metric], full[r["id"]]["scores"][metric])
                     for r in records
                     if r["id"] in full and r["scores"].get(metric) is not None]
            if pairs:
                diffs = [a - b for a, b in pairs]
                out["vs_full"][metric] = {"delta": float(np.mean(diffs)),
                                          "ci95": bootstrap_ci(diffs, seed)}
        diffs = [a - b for r in records if r["id"] in full
                 and (a := task_score(r)) is not None
                 and (b := task_score(full[r["id"]])) is not None]
        if diffs:  # each answer under its task's metric, paired with full's
            out["vs_full"]["score"] = {"delta": float(np.mean(diffs)),
                                       "ci95": bootstrap_ci(diffs, seed)}
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    out["by_group"] = {g: _group_summary(rs, seed) for g, rs in groups.items()}
    return out


def _same_answer(record: dict, full: dict) -> bool:
    """Whether a system gave ``full``'s answer to the question (the extracted answers,
    case and spacing aside)."""
    def norm(r: dict) -> str:
        return " ".join(str(r.get("answer", r.get("output", ""))).lower().split())

    return norm(record) == norm(full)


def _group_summary(records: list[dict], seed: int) -> dict:
    """A group's scores, with its task's metric (``metric``, ``score``) and, when a judge
    ran, the judge's, each with its interval."""
    out: dict = {"n": len(records), **{m: _mean(_metric_values(records, m)) for m in METRICS},
                 "subem_ci95": bootstrap_ci(_metric_values(records, "subem"), seed)}
    metrics = {TASK_METRICS[r.get("task", "qa")] for r in records}
    out["metric"] = metrics.pop() if len(metrics) == 1 else "mixed"
    values = [v for r in records if (v := task_score(r)) is not None]
    out["score"] = _mean(values)
    out["score_ci95"] = bootstrap_ci(values, seed)
    judged = _metric_values(records, "judge")
    if judged:
        out["judge_ci95"] = bootstrap_ci(judged, seed)
    return out


def kv_tokens_per_corpus(records: Sequence[dict], at_once: int | None = None) -> float | None:
    """KV tokens held, averaged over corpora, while a corpus's questions are answered and
    kept alive together: the shared part once (``shared_kv_tokens``: the prefix under a
    prefix cache, the compressed corpus under ``once:``) plus the questions' own parts.
    ``at_once``: that many of them at a time (their mean own part, times the count; all of
    a corpus's questions when it has fewer), else all of them."""
    corpora: dict[str, list[dict]] = {}
    for r in records:
        if "corpus" in r:
            corpora.setdefault(r["corpus"], []).append(r)
    held = []
    for rs in corpora.values():
        own = [r["cost"]["kv_tokens"] - r["cost"].get("shared_kv_tokens", 0.0) for r in rs]
        together = sum(own) if at_once is None else min(at_once, len(own)) * _mean(own)
        held.append(max(r["cost"].get("shared_kv_tokens", 0.0) for r in rs) + together)
    return _mean(held)


def summarize(
    records: Sequence[dict], system_names: Sequence[str], question_ids: Sequence[str],
    meta: dict, seed: int = 0, at_once: int | None = None,
) -> dict:
    """Summarise the records of ``system_names`` on ``question_ids`` (this run's questions);
    ``at_once``: how many of a corpus's questions its KV per corpus holds together (all)."""
    wanted = set(question_ids)
    by_system: dict[str, list[dict]] = {name: [] for name in system_names}
    for r in records:
        if r["system"] in by_system and r["id"] in wanted:
            by_system[r["system"]].append(r)
    full = {r["id"]: r for r in by_system["full"]} if "full" in by_system else None
    systems = {
        name: _system_summary(rs, None if name == "full" else full, seed, at_once)
        for name, rs in by_system.items()
    }
    return {"systems": systems, **meta, "questions_at_once": at_once}


def _together(at_once: int | None) -> str:
    return ("a corpus's questions" if at_once is None
            else f"{at_once} of a corpus's questions answered at once")


def format_value(x: float | None, pct: bool = True) -> str:
    """A share as a percentage with one decimal (``pct``), else a count or seconds."""
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def format_ci(ci: list[float] | None) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and not np.isnan(ci[0]) else ""


def _delta(system: dict, metric: str) -> str:
    delta = system.get("vs_full", {}).get(metric)
    return f"{100 * delta['delta']:+.1f} {format_ci(delta['ci95'])}" if delta else "–"


def render_markdown(summary: dict) -> str:
    peaks = any(s.get("peak_bytes_max") for s in summary["systems"].values())
    recalls = any(s.get("host_kv_bytes_mean") for s in summary["systems"].values())
    lines = [
        f"# kvrag comparison: {summary['dataset']}",
        "",
        f"Model `{summary['model']}`, engine `{summary['engine']}`. Scores in %, with 95% "
        "bootstrap intervals over questions; Δ is the paired difference against `full`. "
        "KV tokens: cache size at decode start; attended: what each decoded token reads "
        "(less than KV tokens only for retrieval attention). SubEM reads the extracted "
        "answer; SubEM out, a gold answer anywhere in the output. Cut: share of answers "
        f"that hit the {summary.get('max_new_tokens', '?')}-token limit. KV per corpus: "
        f"what {_together(summary.get('questions_at_once'))} hold together, the shareable "
        "prefix (a prefix cache's "
        "full one, or a once: system's compressed one) counted once; prefilled: prompt "
        "tokens each question computed; same as full: share of questions answered as "
        "`full` answered them." + (" Peak MiB: the most memory the process "
                                             "allocated while answering (CUDA)." if peaks
                                             else "")
        + (" Recalled: corpus tokens per layer a +recall question brought back (part of its "
           "KV tokens); recall s: choosing and copying them; host KV MiB: the corpus's "
           "evicted entries held in host memory, once per corpus." if recalls else ""),
        "",
        "| system | n | SubEM | 95% CI | Δ SubEM vs full | same as full | SubEM out "
        "| Δ SubEM out vs full | EM | F1 | MC acc | cut | doc recall | KV tokens | attended "
        "| KV per corpus | prompt tokens | prefilled | latency s |"
        + (" peak MiB |" if peaks else "")
        + (" recalled | recall s | host KV MiB |" if recalls else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        + ("---|" if peaks else "") + ("---|---|---|" if recalls else ""),
    ]
    for name, s in summary["systems"].items():
        mib = s["peak_bytes_max"] / 2**20 if s.get("peak_bytes_max") else None
        peak = f" {format_value(mib, False)} |" if peaks else ""
        lines.append(
            f"| {name} | {s['n']} | {format_value(s['subem'])} "
            f"| {format_ci(s['ci95'].get('subem'))} "
            f"| {_delta(s, 'subem')} | {format_value(s.get('same_as_full'))} "
            f"| {format_value(s['subem_output'])} | {_delta(s, 'subem_output')} "
            f"| {format_value(s['em'])} | {format_value(s['f1'])} | {format_value(s['accuracy'])} "
            f"| {format_value(s['truncated'])} "
            f"| {format_value(s['doc_recall'])} | {format_value(s['kv_tokens_mean'], False)} "
            f"| {format_value(s['attended_tokens_mean'], False)} "
            f"| {format_value(s.get('kv_tokens_per_corpus'), False)} "
            f"| {format_value(s['prompt_tokens_mean'], False)} "
            f"| {format_value(s.get('prefill_tokens_mean'), False)} "
            f"| {format_value(s['latency_s_mean'], False)} |"
            + peak + (_recall_cells(s) if recalls else "")
        )
    lines += _task_table(summary)
    return "\n".join(lines) + "\n"


def _recall_cells(s: dict) -> str:
    host = s.get("host_kv_bytes_mean")
    if not host:
        return " – | – | – |"
    return (f" {format_value(s.get('recalled_tokens_mean'), False)} "
            f"| {format_value(s.get('recall_s_mean'), False)} "
            f"| {format_value(host / 2**20 if host else None, False)} |")


def _task_table(summary: dict) -> list[str]:
    """Each group under its task's metric, with its interval (and the judge's, if any)."""
    systems = summary["systems"]
    groups = sorted({g for s in systems.values() for g in s["by_group"]})
    if not groups:
        return []
    metric = {g: next(s["by_group"][g]["metric"] for s in systems.values()
                      if g in s["by_group"]) for g in groups}
    judged = any("judge_ci95" in gs for s in systems.values() for gs in s["by_group"].values())
    lines = ["", "## Score by task: each task's metric, 95% CI (n)"
             + ("; judge: an LLM judge's 0-100 rating" if judged else ""), "",
             "| system | " + " | ".join(f"{g} ({METRIC_NAMES.get(metric[g], metric[g])})"
                                       for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for name, s in systems.items():
        cells = []
        for g in groups:
            gs = s["by_group"].get(g)
            if gs is None:
                cells.append("–")
                continue
            cell = f"{format_value(gs['score'])} {format_ci(gs['score_ci95'])} ({gs['n']})"
            if "judge_ci95" in gs:
                cell += f"; judge {format_value(gs['judge'])} {format_ci(gs['judge_ci95'])}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _family(name: str) -> str:
    """A system's name without its ratio, budget or token count: what joins its points."""
    return re.sub(r"[:@][0-9.]+$", "", name)


def plot_accuracy_vs_kv(summary: dict, path: Path) -> None:
    """Task score (95% CI) against KV held, ``full`` marked by a dashed line, the points
    of one method at several ratios (or one RAG at several budgets) joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    points: dict[str, list[tuple[float, float]]] = {}
    colours: dict[str, str] = {}
    for name, s in summary["systems"].items():
        if s.get("score") is None or s["kv_tokens_mean"] is None:
            continue
        lo, hi = s["ci95"].get("score", [s["score"], s["score"]])
        y = 100 * s["score"]
        family = _family(name)
        bar = ax.errorbar(s["kv_tokens_mean"], y, yerr=[[y - 100 * lo], [100 * hi - y]],
                          fmt="*" if name == "full" else "o", markersize=10 if name == "full"
                          else 6, capsize=3, label=f"{name} (n={s['n']})",
                          color=colours.get(family))
        colours.setdefault(family, bar.lines[0].get_color())
        points.setdefault(family, []).append((s["kv_tokens_mean"], y))
        if name == "full":
            ax.axhline(y, color=colours[family], linestyle="--", linewidth=0.8)
    for family, xy in points.items():
        if len(xy) > 1:
            xs, ys = zip(*sorted(xy), strict=True)
            ax.plot(xs, ys, color=colours[family], linewidth=1)
    ax.set_xlabel("KV-cache tokens at decode start (mean)")
    ax.set_ylabel("task score (%): SubEM, MC accuracy, ROUGE-L")
    ax.set_title(f"{summary['model']} on {summary['dataset']} (dashed: full)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(summary: dict, out_dir: Path) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(render_markdown(summary))
    plot_accuracy_vs_kv(summary, out_dir / "accuracy_vs_kv.png")
