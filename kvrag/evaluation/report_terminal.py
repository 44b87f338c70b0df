"""The compact tables ``kvrag compare`` prints at its end, made to fit a 100-column
terminal: one line per system, then each system's score per task. ``summary.md`` keeps
every column."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvrag.evaluation.report import format_ci, format_value

WIDTH = 100


def _delta(s: dict) -> str:
    delta = s.get("vs_full", {}).get("score")
    if delta is None:
        return "–"
    return f"{100 * delta['delta']:+.1f}\n{format_ci(delta['ci95'])}"


def _kv(s: dict) -> str:
    if s.get("kv_bytes_mean"):
        return f"{s['kv_bytes_mean'] / 2**20:,.1f} MiB"
    return f"{format_value(s.get('kv_tokens_mean'), False)} tok"


def systems_table(summary: dict) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  caption="score: each task's metric, % with 95% CI; Δ: paired, against full; "
                          "KV: held at decode start, measured; same: answers equal to full's",
                  caption_justify="left")
    table.add_column("system", overflow="fold", ratio=1, min_width=18)
    for name in ("n", "score", "Δ vs full", "KV", "same", "prefilled", "s/answer"):
        table.add_column(name, justify="right", no_wrap=True)
    for name, s in summary["systems"].items():
        score = f"{format_value(s.get('score'))}\n{format_ci(s['ci95'].get('score'))}"
        table.add_row(escape(name), str(s["n"]), score, _delta(s), _kv(s),
                      format_value(s.get("same_as_full")),
                      format_value(s.get("prefill_tokens_mean"), False),
                      format_value(s.get("latency_s_mean"), False))
    return table


def tasks_table(summary: dict) -> Table | None:
    """Each system's score per task (its metric, %), n in the header."""
    systems = summary["systems"]
    groups = sorted({g for s in systems.values() for g in s["by_group"]})
    if len(groups) < 2:
        return None
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  caption="score by task, %", caption_justify="left")
    table.add_column("system", overflow="fold", ratio=1, min_width=12)
    for g in groups:
        n = max(s["by_group"][g]["n"] for s in systems.values() if g in s["by_group"])
        table.add_column(f"{g}\n(n={n})", justify="right", overflow="fold")
    for name, s in systems.items():
        table.add_row(escape(name), *(format_value(s["by_group"][g]["score"])
                                      if g in s["by_group"] else "–" for g in groups))
    return table


def print_tables(console: Console, summary: dict) -> None:
    """Both tables, wrapped to at most ``WIDTH`` columns even on a console that does not
    wrap (kvrag's, which keeps long paths on one line)."""
    width = min(console.width, WIDTH)
    console.print(systems_table(summary), width=width, soft_wrap=False)
    if (tasks := tasks_table(summary)) is not None:
        console.print(tasks, width=width, soft_wrap=False)
