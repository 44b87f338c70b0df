"""Serving benchmark: SGLang's own backend vs the kvrag backend over it, on one long prompt.

The baseline is what an operator runs on that device: triton with CUDA graphs on CUDA,
torch_native on a CPU. On CUDA the backend the plugin wraps, triton, also runs without
CUDA graphs, as the plugin does. Phase 1 runs the baseline engines; phase 2 one kvrag
engine, where each repeat sends the prompt
uncompressed (the plugin's own baseline) and at every ratio, interleaved so a noisy
machine's drift hits them alike. Each request streams NEW_TOKENS tokens (EOS
ignored): prefill is the time to the first token, decode speed is the rest. KV slots
held after prefill come from the plugin's stats (the prompt's slots minus those freed).
The radix cache is flushed before every request, so no run reuses another's prefix.
``same_tokens_as_base`` says whether a system's greedy tokens equal the baseline's;
``same_tokens_as_inner`` whether they equal the wrapped backend's without CUDA graphs (at
ratio 0 they must; a compressed cache may change them).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvrag.engine_plugin import config as plugin_config
from kvrag.engine_plugin.stats import StatsLog
from kvrag.engines.device import Placement

CPU = Placement(torch.device("cpu"), torch.float32)


@dataclass(frozen=True)
class ServingRow:
    system: str
    same_tokens_as_base: bool
    same_tokens_as_inner: bool  # as the backend kvrag wraps, without CUDA graphs
    kv_slots: float  # held after prefill (and compression)
    prefill_s: float  # medians over repeats
    decode_tok_s: float
    compress_s: float
    kv_vs_base: float  # ratios to the baseline (the first row) measured in the same run
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
    tokens: tuple[int, ...] = ()


def base_backend(placement: Placement) -> str:
    """The SGLang backend kvrag wraps on this device."""
    return "torch_native" if placement.device.type == "cpu" else "triton"


def baselines(placement: Placement) -> list[tuple[str, bool]]:
    """(row name, CUDA graphs on) of the baseline engines, what operators run first."""
    inner = base_backend(placement)
    graphs = [(f"{inner}+cuda-graphs", True)] if placement.device.type == "cuda" else []
    return [*graphs, (inner, False)]


def plugin_environ(stats: Path, decode_path: str) -> dict[str, str]:
    """The plugin's settings for a kvrag engine: its stats file, and who decodes
    (``auto``: the plugin's default for its inner backend)."""
    env = {plugin_config.ENV_STATS: str(stats)}
    if decode_path != "auto":
        env[plugin_config.ENV_DECODE_PATH] = decode_path
    return env


def start_engine(model_path: Path, backend: str, max_total_tokens: int, placement: Placement,
                 load_format: str | None, cuda_graph: bool = False):
    """An in-process SGLang engine; ``cuda_graph`` only for a baseline (the kvrag backend
    refuses them)."""
    import sglang

    where = {"device": placement.device.type, "dtype": placement.dtype_name}
    if placement.device.type == "cpu":
        where["mem_fraction_static"] = 0.3  # SGLang's default is sized for accelerators
    elif placement.device.index:
        where["base_gpu_id"] = placement.device.index
    if load_format is not None:
        where["load_format"] = load_format
    return sglang.Engine(
        model_path=str(model_path), attention_backend=backend,
        disable_cuda_graph=not cuda_graph,
        disable_overlap_schedule=True, max_total_tokens=max_total_tokens,
        skip_tokenizer_init=True, random_seed=0, **where)


def flush(engine, timeout_s: float = 30.0) -> None:
    """Empty the radix cache. SGLang refuses while a request is still being finished,
    which a client sees just after its last token, so this retries until it is done."""
    deadline = time.monotonic() + timeout_s
    while not getattr(engine.flush_cache(), "success", True):
        if time.monotonic() > deadline:
            raise RuntimeError(f"SGLang would not flush its radix cache for {timeout_s:.0f} s")
        time.sleep(0.05)


def _run(engine, ids: list[int], new_tokens: int, custom: dict | None,
         stats: StatsLog | None) -> _Run:
    flush(engine)
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
    if first is None or len(last.get("output_ids", [])) != new_tokens:
        raise RuntimeError(f"a request ended after {len(last.get('output_ids', []))} of "
                           f"{new_tokens} tokens: {last.get('meta_info', {})}")
    record = stats.pop(last["meta_info"]["id"]) if stats is not None else None
    slots = len(ids) - record["freed"] + record["allocated"] if record else len(ids)
    return _Run(slots, first - t0, (new_tokens - 1) / (t1 - first),
                record["seconds"] if record else 0.0, tuple(last["output_ids"]))


def bench_serving(
    model_path: Path, method: str = "snapkv", ratios: Sequence[float] = (0.0, 0.5, 0.9),
    context_tokens: int = 6000, new_tokens: int = 32, repeats: int = 3,
    on_step: Callable[[str], None] = lambda label: None,
    placement: Placement = CPU, load_format: str | None = None, decode_path: str = "auto",
) -> tuple[int, list[ServingRow]]:
    """(prompt tokens, rows: the baselines first, then kvrag none and each ratio).

    ``load_format="dummy"`` lets SGLang fill the weights with seeded random values: a
    checkpoint directory then needs only its config and tokenizer.
    """
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
    inner = base_backend(placement)
    runs: dict[str, list[_Run]] = {}
    for name, graphs in baselines(placement):
        runs[name] = []
        on_step(f"starting {name} engine")
        engine = start_engine(model_path, inner, pool, placement, load_format, graphs)
        try:
            for r in range(repeats):
                on_step(f"{name} (repeat {r + 1}/{repeats})")
                runs[name].append(_run(engine, ids, new_tokens, None, None))
        finally:
            engine.shutdown()

    stats = Path(tempfile.mkstemp(prefix="kvrag-serving-", suffix=".jsonl")[1])
    systems = [("kvrag none", {plugin_config.PARAM_SPEC: "none"})] + [
        (f"kvrag {method}:{ratio!r}", {plugin_config.PARAM_SPEC: f"{method}:{ratio!r}",
                                        plugin_config.PARAM_SPAN: list(enc.span)})
        for ratio in ratios]
    runs |= {name: [] for name, _ in systems}
    on_step("starting kvrag engine")
    with plugin_config.engine_environ(plugin_environ(stats, decode_path)):
        engine = start_engine(model_path, "kvrag", pool, placement, load_format)
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
    base_name = baselines(placement)[0][0]
    base = medians[base_name]
    base_tokens, inner_tokens = runs[base_name][0].tokens, runs[inner][0].tokens
    rows = [ServingRow(name, all(r.tokens == base_tokens for r in runs[name]),
                       all(r.tokens == inner_tokens for r in runs[name]), m.kv_slots,
                       m.prefill_s, m.decode_tok_s, m.compress_s,
                       m.kv_slots / base.kv_slots, m.prefill_s / base.prefill_s,
                       m.decode_tok_s / base.decode_tok_s) for name, m in medians.items()]
    return len(ids), rows
