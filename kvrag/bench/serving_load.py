"""Serving under load: many long requests at once against a fixed KV pool.

What a deployer buys compression for: with a pool that holds ``P`` tokens, how many long
requests run at once, and how many tokens per second come out. One run sends the same
``N`` requests (distinct demo corpora, ``context_tokens`` each), all at once, to:

- the baseline engine (the backend kvrag wraps there: torch_native on a CPU, triton on
  CUDA) with full caches;
- one kvrag engine, with each request uncompressed (``kvrag none``) and then at each ratio.

Per system: the most requests decoding at once (a request counts from its first token to
its last), next to the bound memory alone sets (``memory_bound``); generated tokens per
second over the whole run (first submission to last completion, as
``sglang.bench_serving`` reports output throughput); median time to first token (queueing
included) and median time per output token after the first. Every ratio is to the
baseline measured in the same run. The radix cache is flushed between systems.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvrag.bench.serving import CPU, base_backend, flush, plugin_environ, start_engine
from kvrag.engine_plugin import config as plugin_config
from kvrag.engine_plugin.stats import StatsLog
from kvrag.engines.device import Placement


@dataclass(frozen=True)
class LoadRow:
    system: str
    requests: int
    max_running_requests: int
    bound_running_requests: int
    decode_tokens_per_s: float
    ttft_s_median: float
    tpot_s_median: float
    kv_tokens_median: float  # held per request once prefilled (and compressed)
    same_tokens_as_base: bool
    running_vs_bound: float
    running_vs_base: float
    decode_vs_base: float
    ttft_vs_base: float
    tpot_vs_base: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Trace:
    submitted: float
    first: float
    done: float
    tokens: tuple[int, ...]
    kv_tokens: float


def memory_bound(prompt: int, held: float, new_tokens: int, pool: int, requests: int) -> int:
    """Most requests running at once if KV memory were the only limit.

    A request being prefilled holds its whole ``prompt``; one past prefill holds ``held``
    tokens (its prompt, or its kept tokens once compacted) plus its ``new_tokens`` decoded
    ones. So m run together when ``(m - 1) * (held + new_tokens) + prompt <= pool``.
    """
    if prompt > pool:
        return 0
    return min(requests, 1 + int((pool - prompt) // (held + new_tokens)))


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one ending as another starts: not both)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    most = running = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


async def _one(engine, ids: list[int], params: dict) -> tuple[float, float, dict]:
    first = None
    last: dict = {}
    stream = await engine.async_generate(input_ids=ids, sampling_params=params, stream=True)
    async for chunk in stream:
        if first is None:
            first = time.perf_counter()
        last = chunk
    return first or time.perf_counter(), time.perf_counter(), last


def _load(engine, prompts: list[list[int]], new_tokens: int, custom: list[dict | None],
          stats: StatsLog | None) -> list[_Trace]:
    flush(engine)
    t0 = time.perf_counter()
    params = [{"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
              | ({"custom_params": c} if c else {}) for c in custom]

    async def all_requests():
        return await asyncio.gather(*[_one(engine, ids, p)
                                      for ids, p in zip(prompts, params, strict=True)])

    traces = []
    for ids, (first, done, last) in zip(prompts, engine.loop.run_until_complete(
            all_requests()), strict=True):
        if len(last.get("output_ids", [])) != new_tokens:
            raise RuntimeError(f"a request ended after {len(last.get('output_ids', []))} of "
                               f"{new_tokens} tokens: {last.get('meta_info', {})}")
        record = stats.pop(last["meta_info"]["id"]) if stats is not None else None
        held = len(ids) - record["freed"] + record["allocated"] if record else len(ids)
        traces.append(_Trace(t0, first, done, tuple(last["output_ids"]), float(held)))
    return traces


def bench_serving_load(
    model_path: Path, method: str = "snapkv", ratios: Sequence[float] = (0.5, 0.9),
    requests: int = 12, context_tokens: int = 4000, new_tokens: int = 128,
    pool_tokens: int | None = None, on_step: Callable[[str], None] = lambda label: None,
    placement: Placement = CPU, load_format: str | None = None, decode_path: str = "auto",
) -> tuple[dict, list[LoadRow]]:
    """(settings: prompt tokens, pool; rows: the baseline first, kvrag none, each ratio).

    ``pool_tokens`` defaults to what holds 4 full requests at once.
    """
    from transformers import AutoTokenizer

    from kvrag.data.demo import make_demo
    from kvrag.data.prompt import build_prompt
    from kvrag.engines.chat import encode_prompt

    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: the first comes from the prefill")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    per_task = -(-requests // 4)  # the demo has four task families
    instances = make_demo(seed=3, context_tokens=context_tokens, per_task=per_task)[:requests]
    encoded = [encode_prompt(tokenizer, build_prompt(inst)) for inst in instances]
    prompts = [enc.input_ids for enc in encoded]
    longest = max(len(p) for p in prompts)
    pool = pool_tokens or 4 * (longest + new_tokens)
    if pool < longest + new_tokens:
        raise ValueError(f"--pool-tokens {pool} cannot hold one request of {longest} prompt "
                         f"and {new_tokens} new tokens")
    base_name = base_backend(placement)
    traces: dict[str, list[_Trace]] = {}

    on_step(f"{base_name}: {requests} requests at once")
    engine = start_engine(model_path, base_name, pool, placement, load_format)
    try:
        traces[f"{base_name} full"] = _load(engine, prompts, new_tokens, [None] * requests,
                                            None)
    finally:
        engine.shutdown()

    systems = [("kvrag none", [{plugin_config.PARAM_SPEC: "none"}] * requests)] + [
        (f"kvrag {method}:{ratio!r}",
         [{plugin_config.PARAM_SPEC: f"{method}:{ratio!r}",
           plugin_config.PARAM_SPAN: list(enc.span)} for enc in encoded])
        for ratio in ratios]
    stats = Path(tempfile.mkstemp(prefix="kvrag-load-", suffix=".jsonl")[1])
    with plugin_config.engine_environ(plugin_environ(stats, decode_path)):
        on_step("starting kvrag engine")
        engine = start_engine(model_path, "kvrag", pool, placement, load_format)
    log = StatsLog(stats)
    try:
        for name, custom in systems:
            on_step(f"{name}: {requests} requests at once")
            traces[name] = _load(engine, prompts, new_tokens, custom, log)
    finally:
        engine.shutdown()
        stats.unlink(missing_ok=True)

    prompt_median = statistics.median(len(p) for p in prompts)
    rows = _rows(traces, f"{base_name} full", prompt_median, new_tokens, pool, requests)
    settings = {"requests": requests, "prompt_tokens_median": prompt_median,
                "prompt_tokens_max": longest, "new_tokens": new_tokens, "pool_tokens": pool}
    return settings, rows


def _rows(traces: dict[str, list[_Trace]], base_name: str, prompt: float, new_tokens: int,
          pool: int, requests: int) -> list[LoadRow]:
    summary = {}
    for name, ts in traces.items():
        makespan = max(t.done for t in ts) - min(t.submitted for t in ts)
        held = statistics.median(t.kv_tokens for t in ts)
        summary[name] = dict(
            max_running_requests=max_overlap([(t.first, t.done) for t in ts]),
            bound_running_requests=memory_bound(int(prompt), held, new_tokens, pool, requests),
            decode_tokens_per_s=sum(len(t.tokens) for t in ts) / makespan,
            ttft_s_median=statistics.median(t.first - t.submitted for t in ts),
            tpot_s_median=statistics.median((t.done - t.first) / (len(t.tokens) - 1)
                                            for t in ts),
            kv_tokens_median=held)
    base = summary[base_name]
    base_tokens = [t.tokens for t in traces[base_name]]
    return [LoadRow(
        system=name, requests=requests, **s,
        same_tokens_as_base=[t.tokens for t in traces[name]] == base_tokens,
        running_vs_bound=s["max_running_requests"] / max(1, s["bound_running_requests"]),
        running_vs_base=s["max_running_requests"] / base["max_running_requests"],
        decode_vs_base=s["decode_tokens_per_s"] / base["decode_tokens_per_s"],
        ttft_vs_base=s["ttft_s_median"] / base["ttft_s_median"],
        tpot_vs_base=s["tpot_s_median"] / base["tpot_s_median"],
    ) for name, s in summary.items()]
