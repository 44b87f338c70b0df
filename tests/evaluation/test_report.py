from pathlib import Path

import pytest

from kvrag.evaluation.report import (
    bootstrap_ci,
    kv_tokens_per_corpus,
    render_markdown,
    summarize,
    write_reports,
)


def rec(qid: str, system: str, subem: float, kv: int, group: str = "g") -> dict:
    return {"id": qid, "system": system, "group": group,
            "scores": {"subem": subem, "em": subem, "f1": subem, "accuracy": None,
                       "cite_precision": None, "cite_recall": None},
            "cost": {"kv_tokens": kv, "kv_bytes": 10 * kv, "prompt_tokens": kv,
                     "latency_s": 1.0, "prefill_s": 0.5, "decode_s": 0.5, "compress_s": 0.0,
                     "attended_tokens": kv}}


def test_bootstrap_interval_contains_mean_and_is_seeded() -> None:
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    lo, hi = bootstrap_ci(values, seed=3)
    assert lo < 0.7 < hi and lo >= 0 and hi <= 1
    assert bootstrap_ci(values, seed=3) == [lo, hi]
    assert bootstrap_ci([1, 1, 1], seed=0) == [1.0, 1.0]


def test_summary_pairs_against_full_on_this_runs_questions() -> None:
    records = [rec(f"q{i}", "full", 1.0, 100) for i in range(10)]
    records += [rec(f"q{i}", "other", float(i < 5), 50, "h") for i in range(10)]
    records.append(rec("q99", "full", 0.0, 100))  # from an earlier, larger run
    summary = summarize(records, ["full", "other"], [f"q{i}" for i in range(10)],
                        {"model": "m", "engine": "hf", "dataset": "d"})
    full, other = summary["systems"]["full"], summary["systems"]["other"]
    assert full["n"] == 10 and full["subem"] == 1.0 and "vs_full" not in full
    assert other["subem"] == 0.5 and other["kv_tokens_mean"] == 50
    assert other["vs_full"]["subem"]["delta"] == pytest.approx(-0.5)
    lo, hi = other["vs_full"]["subem"]["ci95"]
    assert lo < -0.5 < hi < 0
    assert other["accuracy"] is None and other["doc_recall"] is None
    assert other["by_group"]["h"]["n"] == 10


def test_reports_written(tmp_path: Path) -> None:
    records = [rec(f"q{i}", "full", float(i % 2), 100) for i in range(6)]
    summary = summarize(records, ["full"], [f"q{i}" for i in range(6)],
                        {"model": "m", "engine": "hf", "dataset": "d"})
    write_reports(summary, tmp_path)
    md = render_markdown(summary)
    assert "| full | 6 | 50.0 |" in md
    png = (tmp_path / "accuracy_vs_kv.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_both_subem_views_and_truncation_are_summarised() -> None:
    records = []
    for i in range(8):
        full = rec(f"q{i}", "full", 1.0, 100) | {"truncated": i == 0}
        full["scores"]["subem_output"] = 1.0
        cut = rec(f"q{i}", "rag:9", float(i < 4), 40) | {"truncated": i < 2}
        cut["scores"]["subem_output"] = 1.0  # the gold is in every output
        records += [full, cut]
    summary = summarize(records, ["full", "rag:9"], [f"q{i}" for i in range(8)],
                        {"model": "m", "engine": "hf", "dataset": "d", "max_new_tokens": 64})
    rag = summary["systems"]["rag:9"]
    assert rag["subem"] == 0.5 and rag["subem_output"] == 1.0
    assert rag["ci95"]["subem_output"] == [1.0, 1.0]
    assert rag["vs_full"]["subem_output"]["delta"] == 0.0
    assert rag["vs_full"]["subem"]["delta"] == -0.5
    assert rag["truncated"] == 0.25 and summary["systems"]["full"]["truncated"] == 0.125
    md = render_markdown(summary)
    assert "64-token limit" in md
    assert "| rag:9 | 8 | 50.0 | [" in md and "| 100.0 | +0.0 [0.0, 0.0] |" in md
    assert "| 25.0 |" in md


def test_kv_per_corpus_counts_the_shared_prefix_once() -> None:
    def held(corpus: str, kv: float, shared: float) -> dict:
        return {"corpus": corpus, "cost": {"kv_tokens": kv, "shared_kv_tokens": shared}}

    # full over a 1000-token prefix, two questions of 20 and 30 own tokens
    assert kv_tokens_per_corpus([held("a", 1020, 1000), held("a", 1030, 1000)]) == 1050
    # per question: every kept copy is the question's own
    assert kv_tokens_per_corpus([held("a", 520, 0), held("a", 530, 0)]) == 1050
    # two corpora are averaged; records from before corpora were recorded are left out
    records = [held("a", 520, 500), held("a", 530, 500), held("b", 110, 100),
               {"cost": {"kv_tokens": 9}}]
    assert kv_tokens_per_corpus(records) == (550 + 110) / 2
    assert kv_tokens_per_corpus([{"cost": {"kv_tokens": 9}}]) is None


def test_kv_per_corpus_with_some_questions_at_once() -> None:
    def held(kv: float, shared: float) -> dict:
        return {"corpus": "a", "cost": {"kv_tokens": kv, "shared_kv_tokens": shared}}

    # a 300-token compressed corpus; 8 questions own 40..110 tokens (mean 75)
    records = [held(300 + own, 300) for own in range(40, 120, 10)]
    assert kv_tokens_per_corpus(records) == 300 + sum(range(40, 120, 10))
    assert kv_tokens_per_corpus(records, at_once=4) == 300 + 4 * 75
    assert kv_tokens_per_corpus(records, at_once=20) == kv_tokens_per_corpus(records)
    answers = []
    for i, r in enumerate(records):
        answer = rec(f"q{i}", "full", 1.0, r["cost"]["kv_tokens"])
        answers.append(answer | {"corpus": "a", "cost": answer["cost"] | r["cost"]})
    summary = summarize(answers, ["full"], [f"q{i}" for i in range(8)],
                        {"model": "m", "engine": "hf", "dataset": "d"}, at_once=4)
    assert summary["systems"]["full"]["kv_tokens_per_corpus"] == 600
    assert summary["questions_at_once"] == 4
    assert "what 4 of a corpus's questions answered at once hold together" in \
        render_markdown(summary)


def test_each_group_is_summarised_under_its_tasks_metric() -> None:
    records = [rec("q1", "full", 1.0, 10, group="qa"), rec("q2", "full", 0.0, 10, group="qa")]
    for qid, rouge, judge in (("s1", 0.5, 0.9), ("s2", 0.3, 0.1)):
        r = rec(qid, "full", 0.0, 10, group="summaries")
        r["task"] = "sum"
        r["scores"] |= {"subem": None, "em": None, "f1": None, "rouge_l": rouge, "judge": judge}
        records.append(r)
    s = summarize(records, ["full"], ["q1", "q2", "s1", "s2"], {"model": "m", "engine": "e",
                                                                "dataset": "d"})
    groups = s["systems"]["full"]["by_group"]
    assert groups["qa"]["metric"] == "subem" and groups["qa"]["score"] == 0.5
    assert groups["summaries"]["metric"] == "rouge_l"
    assert groups["summaries"]["score"] == pytest.approx(0.4)
    assert groups["summaries"]["judge"] == pytest.approx(0.5)
    assert "judge_ci95" in groups["summaries"] and "judge_ci95" not in groups["qa"]
    assert s["systems"]["full"]["subem"] == 0.5  # summaries have no SubEM
    md = render_markdown(s)
    assert "summaries (ROUGE-L)" in md and "qa (SubEM)" in md
    assert "40.0 [30.0, 50.0] (2); judge 50.0 [10.0, 90.0]" in md


def test_peak_memory_shows_per_system_where_it_was_measured() -> None:
    records = [rec(f"q{i}", "full", 1.0, 100) for i in range(3)]
    records += [rec(f"q{i}", "other", 1.0, 50) for i in range(3)]
    meta = {"model": "m", "engine": "hf", "dataset": "d"}
    ids = [f"q{i}" for i in range(3)]
    assert "peak MiB" not in render_markdown(summarize(records, ["full", "other"], ids, meta))
    for i, r in enumerate(records):  # as on CUDA: 3, 4, 5 MiB each system
        r["cost"]["peak_bytes"] = (3 + i % 3) * 2**20
    summary = summarize(records, ["full", "other"], ids, meta)
    assert summary["systems"]["other"]["peak_bytes_max"] == 5 * 2**20
    row = next(line for line in render_markdown(summary).splitlines()
               if line.startswith("| other |"))
    assert "peak MiB" in render_markdown(summary) and row.endswith("| 5.00 |")


def test_same_answer_as_full_is_the_share_of_questions_answered_alike() -> None:
    records = []
    for i in range(4):
        full = rec(f"q{i}", "full", 1.0, 100)
        full["answer"] = f"Paris {i}"
        other = rec(f"q{i}", "other", 1.0, 50)
        other["answer"] = f" paris  {i}" if i < 3 else "Lyon"  # case and spacing aside
        records += [full, other]
    summary = summarize(records, ["full", "other"], [f"q{i}" for i in range(4)],
                        {"model": "m", "engine": "hf", "dataset": "d"})
    other = summary["systems"]["other"]
    assert other["same_as_full"] == pytest.approx(0.75)
    assert "same_as_full" not in summary["systems"]["full"]
    assert "| same as full |" in render_markdown(summary)


def test_recall_columns_show_what_each_question_recalled_and_the_host_held() -> None:
    records = []
    for i in range(4):
        r = rec(f"q{i}", "once:x+recall@64", 1.0, 300)
        r["corpus"] = "c0"
        r["cost"] |= {"shared_kv_tokens": 200.0, "recalled_tokens": 64.0, "recall_s": 0.25,
                      "host_kv_bytes": 3 * 2**20}
        records.append(r)
    records += [rec(f"q{i}", "full", 1.0, 1000) for i in range(4)]
    summary = summarize(records, ["full", "once:x+recall@64"], [f"q{i}" for i in range(4)],
                        {"model": "m", "engine": "hf", "dataset": "d"})
    recall = summary["systems"]["once:x+recall@64"]
    # the compressed corpus once, and each of the 4 questions' recalled and own tokens
    assert recall["kv_tokens_per_corpus"] == 200 + 4 * 100
    text = render_markdown(summary)
    assert "| recalled | recall s | host KV MiB |" in text
    assert "| 64.00 | 0.25 | 3.00 |" in text
    full_line = next(line for line in text.splitlines() if line.startswith("| full |"))
    assert full_line.endswith("| – | – | – |")


def test_plot_joins_a_methods_ratios_and_marks_full(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from kvrag.evaluation import report

    records = [rec(f"q{i}", s, float(i % 2), kv) for i in range(6)
               for s, kv in (("full", 100), ("snapkv:0.5", 50), ("snapkv:0.75", 25),
                             ("rag:64", 30))]
    summary = summarize(records, ["full", "snapkv:0.5", "snapkv:0.75", "rag:64"],
                        [f"q{i}" for i in range(6)], {"model": "m", "engine": "hf",
                                                      "dataset": "d"})
    saved = []
    real = plt.Figure.savefig
    lines = []

    def keep(fig, path, *a, **k):
        ax = fig.axes[0]
        lines.extend((tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines)
        saved.append(path)
        return real(fig, path, *a, **k)

    plt.Figure.savefig = keep
    try:
        report.plot_accuracy_vs_kv(summary, tmp_path / "plot.png")
    finally:
        plt.Figure.savefig = real
    assert saved and (tmp_path / "plot.png").stat().st_size > 0
    assert ((25.0, 50.0), (50.0, 50.0)) in lines  # snapkv's two ratios joined
    assert any(len(set(ys)) == 1 and ys[0] == 50.0 and xs == (0, 1) for xs, ys in lines)
    assert report._family("once:snapkv[chunk=16]:0.5") == "once:snapkv[chunk=16]"
