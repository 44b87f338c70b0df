"""Serving benchmark: SGLang's torch_native backend vs the kvrag backend on one long prompt.

Phase 1 runs a torch_native engine; phase 2 one kvrag engine, where each repeat sends the
prompt uncompressed (the plugin's own baseline) and at every ratio, interleaved so a
noisy machine's drift hits them alike. Each request streams NEW_TOKENS tokens (EOS
ignored): prefill is the time to the first token, decode speed is the rest. KV slots
held after prefill come from the plugin's stats (the prompt's slots minus those freed).
The radix cache is flushed before every request, so no run reuses another's prefix.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvrag.engine_plugin import config as plugin_config
from kvrag.engine_plugin.stats import StatsLog


@dataclass(frozen=True)
class ServingRow:
    system: str
    kv_slots: float  # held after prefill (and compression)
    prefill_s: float  # medians over repeats
    decode_tok_s: float
    compress_s: float
    kv_vs_base: float  # ratios to torch_native measured in the same run
    prefill_vs_base: float
    decode_speed_vs_base: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Run:
    kv_slots: float
    prefill_s: float
    decode_tok_s: float
    compress_s: float


def _engine(model_path: Path, backend: str, max_total_tokens: int):
    import sglang

    return sglang.Engine(
        model_path=str(model_path), device="cpu", attention_backend=backend, dtype="float32",
        disable_cuda_graph=True, disable_overlap_schedule=True,
        max_total_tokens=max_total_tokens, mem_fraction_static=0.3, skip_tokenizer_init=True,
        random_seed=0)


def _run(engine, ids: list[int], new_tokens: int, custom: dict | None,
         stats: StatsLog | None) -> _Run:
    engine.flush_cache()
    params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
    if custom:
        params["custom_params"] = custom
    t0 = time.perf_counter()
    first = None
    last: dict = {}
    for chunk in engine.generate(input_ids=ids, sampling_params=params, stream=True):
        first = first or time.perf_counter()
        last = chunk
    t1 = time.perf_counter()
    assert first is not None and len(last["output_ids"]) == new_tokens
    record = stats.pop(last["meta_info"]["id"]) if stats is not None else None
    slots = len(ids) - record["freed"] + record["allocated"] if record else len(ids)
    return _Run(slots, first - t0, (new_tokens - 1) / (t1 - first),
                record["seconds"] if record else 0.0)


def bench_serving(
    model_path: Path, method: str = "snapkv", ratios: Sequence[float] = (0.0, 0.5, 0.9),
    context_tokens: int = 6000, new_tokens: int = 32, repeats: int = 3,
    on_step: Callable[[str], None] = lambda label: None,
) -> tuple[int, list[ServingRow]]:
    """(prompt tokens, rows: torch_native first, then kvrag none and each ratio)."""
    from transformers import AutoTokenizer

    from kvrag.data.demo import make_demo
    from kvrag.data.prompt import build_prompt
    from kvrag.engines.chat import encode_prompt

    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: the first comes from the prefill")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    enc = encode_prompt(tokenizer, build_prompt(
        make_demo(seed=1, context_tokens=context_tokens, per_task=1)[0]))
    ids = enc.input_ids
    pool = len(ids) + new_tokens + 1024
    runs: dict[str, list[_Run]] = {"torch_native": []}

    on_step("starting torch_native engine")
    engine = _engine(model_path, "torch_native", pool)
    try:
        for r in range(repeats):
            on_step(f"torch_native (repeat {r + 1}/{repeats})")
            runs["torch_native"].append(_run(engine, ids, new_tokens, None, None))
    finally:
        engine.shutdown()

    stats = Path(tempfile.mkstemp(prefix="kvrag-serving-", suffix=".jsonl")[1])
    systems = [("kvrag none", {plugin_config.PARAM_SPEC: "none"})] + [
        (f"kvrag {method}:{ratio!r}", {plugin_config.PARAM_SPEC: f"{method}:{ratio!r}",
                                        plugin_config.PARAM_SPAN: list(enc.span)})
        for ratio in ratios]
    runs |= {name: [] for name, _ in systems}
    on_step("starting kvrag engine")
    with plugin_config.engine_environ({plugin_config.ENV_STATS: str(stats)}):
        engine = _engine(model_path, "kvrag", pool)
    log = StatsLog(stats)
    try:
        for r in range(repeats):
            for name, custom in systems:
                on_step(f"{name} (repeat {r + 1}/{repeats})")
                runs[name].append(_run(engine, ids, new_tokens, custom, log))
    finally:
        engine.shutdown()
        stats.unlink(missing_ok=True)

    medians = {name: _Run(*(statistics.median(getattr(r, f) for r in rs)
                            for f in ("kv_slots", "prefill_s", "decode_tok_s", "compress_s")))
               for name, rs in runs.items()}
    base = medians["torch_native"]
    rows = [ServingRow(name, m.kv_slots, m.prefill_s, m.decode_tok_s, m.compress_s,
                       m.kv_slots / base.kv_slots, m.prefill_s / base.prefill_s,
                       m.decode_tok_s / base.decode_tok_s) for name, m in medians.items()]
    return len(ids), rows
