"""Many questions over one corpus: what the KV pool holds, and how fast answers start.

``Q`` questions over one corpus of ``context_tokens`` go, in one kvrag engine, through:

- ``full``: a full cache, the corpus in the radix tree after the first question;
- ``METHOD:RATIO``: compressed per question (question-aware), the kept copy its own
  (where the plugin serves the method per question: KVzip it serves compress-once only);
- ``once:METHOD:RATIO``: the corpus compressed once, stored, and matched by the rest;
- ``once:METHOD:RATIO+recall@R``: the same, each question recalling R evicted tokens per
  layer from the host store (for each of ``recall``; METHOD must keep shared heads);
the last three for each ratio asked.

Per system, after flushing the radix cache: question 1 alone (it builds what the others
reuse), then questions 2..Q one at a time, whose median time to first token is reported;
then, after another flush and question 1 again, all Q at once, each decoding
``new_tokens`` tokens: the most KV slots in use during a decode step while all Q run (the
plugin's pool log: the tree's cached prefixes included) is what the system holds. Beside
it, the figure its spec implies: the shared part once (``full``: the corpus prefix;
``once:``: its kept tokens) plus each question's own tokens (its question, or its kept
copy for per-question compression; plus what it recalled) and its decoded ones. The host
store a ``+recall`` corpus keeps is read from the server (``kvrag_pool.host_kv_bytes``)
after the questions ran. Every ratio is to ``full``, measured in the same run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvrag.bench.serving import CPU, flush, plugin_environ, start_engine
from kvrag.bench.serving_load import _one
from kvrag.compression import SpecError, parse_spec
from kvrag.compression.capabilities import Target, check
from kvrag.engine_plugin import config as plugin_config
from kvrag.engine_plugin.once import kept_prefix
from kvrag.engines.device import Placement


@dataclass(frozen=True)
class SharedRow:
    system: str
    questions: int
    slots_held: int  # most KV slots in use while all questions decode
    slots_implied: float  # what the spec implies for the same moment
    running_at_peak: int
    ttft_s_median: float  # questions 2..Q, one at a time
    ttft_first_s: float  # question 1, which builds what the others reuse
    held_vs_implied: float
    held_vs_full: float
    ttft_vs_full: float
    # question 1's time to first token over full's: for once:, what building the compressed
    # prefix (prefill, compression, its question) costs against prefilling it
    first_vs_full: float
    host_kv_bytes: int = 0  # +recall: the corpus's evicted entries in host memory

    def to_json(self) -> dict:
        return asdict(self)


def _pool_peak(path: Path, start: int, questions: int) -> tuple[int, int]:
    """(most slots in use, requests decoding then) over the log lines after ``start``,
    among decode steps that held all ``questions`` (or the most there were)."""
    import json

    with open(path, encoding="utf-8") as f:
        lines = [json.loads(x) for x in f.read().splitlines()[start:]]
    if not lines:
        raise RuntimeError("the plugin wrote no pool log lines; is KVRAG_PLUGIN_POOL_LOG set?")
    most = max(line["running"] for line in lines)
    peak = max(line["used"] for line in lines if line["running"] == most)
    return peak, most


def _host_kv_bytes(engine) -> int:
    """What the server's host stores hold now (``+recall`` corpora)."""
    states = engine.get_server_info()["internal_states"]
    return sum(int(state.get("kvrag_pool", {}).get("host_kv_bytes", 0)) for state in states)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def bench_serving_shared(
    model_path: Path, method: str = "snapkv", ratios: tuple[float, ...] = (0.5,),
    questions: int = 8,
    context_tokens: int = 4000, new_tokens: int = 32, pool_tokens: int | None = None,
    on_step: Callable[[str], None] = lambda label: None, placement: Placement = CPU,
    load_format: str | None = None, decode_path: str = "auto", repeats: int = 1,
    recall: tuple[int, ...] = (),
) -> tuple[dict, list[SharedRow]]:
    """(settings: corpus and question tokens, pool; rows: full, then per question and once
    for each ratio). Question 1 runs ``repeats`` times after a flush each (its median is
    ``ttft_first_s``)."""
    import asyncio

    from transformers import AutoTokenizer

    from kvrag.data.demo import make_demo
    from kvrag.data.prompt import build_prompt
    from kvrag.engines.chat import encode_prompt

    if questions < 2:
        raise ValueError("--shared-corpus needs at least 2 questions: the first builds what "
                         "the others reuse")
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: the first comes from the prefill")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    instances = make_demo(seed=4, context_tokens=context_tokens, per_task=questions,
                          questions_per_corpus=questions)[:questions]
    encoded = [encode_prompt(tokenizer, build_prompt(inst)) for inst in instances]
    end = encoded[0].context_end
    if any(e.input_ids[:end] != encoded[0].input_ids[:end] for e in encoded):
        raise RuntimeError("the questions' prompts do not share their corpus prefix tokens")
    span = encoded[0].span
    own = [len(e.input_ids) - end for e in encoded]  # each question's own prompt tokens
    # implied slots while all decode: shared part once, then each question's own tokens
    decoded = questions * new_tokens
    implied = {"full": float(end + sum(own) + decoded)}
    kept: dict[str, int] = {}
    for ratio in ratios:
        compressed = parse_spec(f"{method}:{ratio!r}")
        once = parse_spec(f"once:{compressed.name}")
        kmax = kept[once.name] = kept_prefix(once, span)
        try:
            check(compressed, Target.PLUGIN)
            implied[compressed.name] = float(sum(kmax + n for n in own) + decoded)
        except SpecError:
            pass  # served compress-once only
        implied[once.name] = float(kmax + sum(own) + decoded)
        for budget in recall:
            recalling = parse_spec(f"{once.name}+recall@{budget}")
            kept[recalling.name] = kmax
            back = recalling.recall.budget(span[1] - span[0], span[1] - kmax)
            implied[recalling.name] = float(kmax + sum(n + back for n in own) + decoded)
    pool = pool_tokens or int(1.5 * (end + sum(len(e.input_ids) for e in encoded)
                                     + 2 * questions * new_tokens))
    stats = Path(tempfile.mkstemp(prefix="kvrag-shared-", suffix=".jsonl")[1])
    pool_log = Path(tempfile.mkstemp(prefix="kvrag-pool-", suffix=".jsonl")[1])
    env = plugin_environ(stats, decode_path) | {plugin_config.ENV_POOL_LOG: str(pool_log)}
    with plugin_config.engine_environ(env):
        on_step("starting kvrag engine")
        engine = start_engine(model_path, "kvrag", pool, placement, load_format)
    params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}

    def ask_all(name: str, which: list[int]) -> list[float]:
        custom = {plugin_config.PARAM_SPEC: "none" if name == "full" else name,
                  plugin_config.PARAM_SPAN: list(span)}

        async def together():
            return await asyncio.gather(*[
                _one(engine, encoded[i].input_ids, params | {"custom_params": custom})
                for i in which])

        t0 = time.perf_counter()
        out = engine.loop.run_until_complete(together())
        for _, _, last in out:
            if len(last.get("output_ids", [])) != new_tokens:
                raise RuntimeError(f"a request ended after {len(last.get('output_ids', []))} "
                                   f"of {new_tokens} tokens: {last.get('meta_info', {})}")
        return [first - t0 for first, _, _ in out]

    measured: dict[str, dict] = {}
    try:
        for name in implied:
            on_step(f"{name}: question 1, then 2..{questions} one at a time")
            builds = []
            for _ in range(repeats):
                flush(engine)
                builds.append(ask_all(name, [0])[0])
            first = statistics.median(builds)
            ttft = [ask_all(name, [i])[0] for i in range(1, questions)]
            on_step(f"{name}: all {questions} questions at once")
            flush(engine)
            ask_all(name, [0])
            start = _lines(pool_log)
            ask_all(name, list(range(questions)))
            peak, running = _pool_peak(pool_log, start, questions)
            measured[name] = {"first": first, "ttft": statistics.median(ttft), "peak": peak,
                              "running": running, "host": _host_kv_bytes(engine)}
    finally:
        engine.shutdown()
        stats.unlink(missing_ok=True)
        pool_log.unlink(missing_ok=True)
    base = measured["full"]
    rows = [SharedRow(name, questions, m["peak"], float(implied[name]), m["running"],
                      m["ttft"], m["first"], m["peak"] / implied[name],
                      m["peak"] / base["peak"], m["ttft"] / base["ttft"],
                      m["first"] / base["first"], m["host"])
            for name, m in measured.items()]
    settings = {"questions": questions, "corpus_prefix_tokens": end,
                "question_tokens_median": statistics.median(own), "kept_prefix_tokens": kept,
                "new_tokens": new_tokens, "pool_tokens": pool}
    return settings, rows
