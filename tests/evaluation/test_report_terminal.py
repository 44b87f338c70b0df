import io

from rich import box
from rich.console import Console

from kvrag.evaluation.report import summarize
from kvrag.evaluation.report_terminal import WIDTH, print_tables, systems_table, tasks_table

SYSTEMS = ["full", "snapkv:0.5", "snapkv[chunk=16;heads=shared]:0.5",
           "once:snapkv[chunk=16;heads=shared]:0.95+recall[chunk=16;window=64]@256",
           "rag[retriever=hybrid]:1024"]
GROUPS = ["finance", "multiple_choice", "single_hop", "two_hop"]


def _record(qid: int, system: str, k: int) -> dict:
    subem = float((qid + k) % 3 != 0)
    return {"id": f"q{qid}", "system": system, "group": GROUPS[qid % 4], "task": "qa",
            "answer": "x" if subem else "y",
            "scores": {"subem": subem, "em": subem, "f1": subem, "accuracy": None},
            "cost": {"kv_tokens": 1234.0 * (k + 1), "kv_bytes": 45_000_000.0 / (k + 1),
                     "prompt_tokens": 2841, "prefill_tokens": 2841.0, "latency_s": 12.25,
                     "attended_tokens": 1234.0}}


def _render(table, edges: bool = False) -> list[str]:
    if edges:  # column borders, to read the first column back
        table.box = box.ASCII
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text().splitlines()


def _first_column(table) -> str:
    return "".join(line.split("|")[1].strip() for line in _render(table, edges=True)
                   if line.count("|") > 2)


def test_the_printed_tables_fit_100_columns_and_cut_nothing() -> None:
    records = [_record(q, s, k) for k, s in enumerate(SYSTEMS) for q in range(40)]
    summary = summarize(records, SYSTEMS, [f"q{q}" for q in range(40)],
                        {"model": "m", "engine": "hf", "dataset": "d"})
    lines = _render(systems_table(summary))
    assert max(len(line) for line in lines) <= WIDTH
    text = "\n".join(lines)
    assert "…" not in text
    names = _first_column(systems_table(summary))
    for name in SYSTEMS:  # a long name folds over lines but is all there
        assert name in names
    for s in summary["systems"].values():
        assert f"{100 * s['score']:.1f}" in text
        assert f"{s['kv_bytes_mean'] / 2**20:,.1f} MiB" in text
    other = summary["systems"]["snapkv:0.5"]["vs_full"]["score"]
    assert f"{100 * other['delta']:+.1f}" in text
    tasks = _render(tasks_table(summary))
    assert max(len(line) for line in tasks) <= WIDTH and "…" not in "\n".join(tasks)
    assert all(g[:8] in "\n".join(tasks) for g in GROUPS)


def test_printed_on_a_console_that_does_not_wrap_they_still_fit() -> None:
    records = [_record(q, s, k) for k, s in enumerate(SYSTEMS) for q in range(40)]
    summary = summarize(records, SYSTEMS, [f"q{q}" for q in range(40)],
                        {"model": "m", "engine": "hf", "dataset": "d"})
    console = Console(width=160, record=True, soft_wrap=True, file=io.StringIO())
    print_tables(console, summary)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    assert any(line.startswith("score: each task's metric") for line in lines)
