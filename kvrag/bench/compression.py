"""Compression benchmark: KV bytes, decode speed and compression cost against ``full``.

Everything is measured in one process on one long prompt, with the systems interleaved
in every repeat so slow drift of a noisy machine hits them alike; medians are reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from kvrag.compression import CompressionSpec, parse_spec
from kvrag.data.demo import make_demo
from kvrag.data.prompt import build_prompt
from kvrag.engines.base import Cost
from kvrag.engines.hf import HFEngine


@dataclass(frozen=True)
class BenchRow:
    system: str
    kv_tokens: float
    kv_bytes: int
    decode_tok_s: float  # median over repeats
    compress_s: float  # median over repeats
    kv_bytes_vs_full: float
    decode_speed_vs_full: float
    compress_vs_prefill: float

    def to_json(self) -> dict:
        return asdict(self)


def bench_compression(
    engine: HFEngine, specs: Sequence[CompressionSpec], context_tokens: int = 6000,
    new_tokens: int = 32, repeats: int = 3,
    on_step: Callable[[str], None] = lambda label: None,
) -> tuple[int, float, list[BenchRow]]:
    """(prompt tokens, median prefill seconds, one row per system with ``full`` first)."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: the first comes from the prefill")
    instance = make_demo(seed=1, context_tokens=context_tokens, per_task=1)[0]
    prompt = build_prompt(instance)
    ids = engine.encode(prompt).input_ids
    prefills = []
    for r in range(repeats):
        on_step(f"prefill (repeat {r + 1}/{repeats})")
        engine.release()
        prefills.append(engine.prefill(ids).seconds)
    prefill_s = statistics.median(prefills)
    systems: list[tuple[str, CompressionSpec | None]] = [("full", None)]
    systems += [(s.name, s) for s in specs]
    runs: dict[str, list] = {name: [] for name, _ in systems}
    for r in range(repeats):
        for name, spec in systems:
            on_step(f"{name} (repeat {r + 1}/{repeats})")
            runs[name].append(engine.generate(prompt, new_tokens, spec, ignore_eos=True).cost)
    base = runs["full"]
    base_speed = statistics.median(_decode_speed(c) for c in base)
    rows = []
    for name, _ in systems:
        costs = runs[name]
        speed = statistics.median(_decode_speed(c) for c in costs)
        compress = statistics.median(c.compress_s for c in costs)
        rows.append(BenchRow(
            system=name, kv_tokens=costs[0].kv_tokens, kv_bytes=costs[0].kv_bytes,
            decode_tok_s=speed, compress_s=compress,
            kv_bytes_vs_full=costs[0].kv_bytes / base[0].kv_bytes,
            decode_speed_vs_full=speed / base_speed, compress_vs_prefill=compress / prefill_s,
        ))
    return len(ids), prefill_s, rows


def _decode_speed(cost: Cost) -> float:
    """Tokens per second of the decode forward passes (the first token comes from prefill)."""
    return (cost.new_tokens - 1) / cost.decode_s


def default_specs(methods: Sequence[str], ratios: Sequence[float]) -> list[CompressionSpec]:
    return [parse_spec(f"{m}:{r}") for m in methods for r in ratios]
