"""A fleet behind sglang-router: where compressed corpora are built, and what the fleet holds.

``C`` corpora x ``Q`` questions (the bundled shared-corpus suite, or any dataset whose
questions name their corpus) go through the router to ``W`` ``kvrag serve`` workers, in
one seeded random order (every arm the same), ``W`` requests in flight. Arms, in one run:

- ``full`` behind the cache-aware router: the prefix cache, the baseline;
- the system (default ``once:snapkv:0.5``) behind each routing policy asked for:
  ``cache_aware`` (the router's approximate prefix tree of each worker's requests),
  ``round_robin``, and ``manual`` (one worker per ``X-SMG-Routing-Key``, which kvrag's
  client sets to the corpus's digest).

Before each arm every worker's radix cache is flushed and a fresh router started. Per arm:
a question *built* its corpus when its worker prefilled at least as many tokens as its
documents hold (the server's report; the chat template's head may be shared by every
corpus); every other question reused what a worker held. ``hit_rate`` is the
share of follow-up questions (all but one per corpus) that reused; ``builds_per_corpus``
is 1.0 when each corpus was built once in the whole fleet. ``slots_held`` is the sum over
workers of the KV slots their pools hold once the traffic is done (``/server_info``,
read from each pool). Time to first token is the client's, median over follow-ups.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvrag.bench.fleet_processes import Fleet
from kvrag.compression import CompressionSpec, parse_spec
from kvrag.data.prompt import Prompt, build_prompt
from kvrag.data.schema import Instance
from kvrag.engines.sglang_url import SGLangURLEngine


@dataclass(frozen=True)
class FleetRow:
    system: str
    policy: str
    questions: int
    builds: int  # questions whose worker prefilled their documents
    builds_per_corpus: float
    hit_rate: float  # follow-up questions that reused a prefix their worker held
    workers_used: int  # workers whose pools hold more than when the arm began
    slots_held: int  # summed over workers, after the traffic
    held_vs_full: float
    ttft_s_median: float  # follow-up questions
    ttft_vs_full: float
    resent: int  # requests the client sent again (a lost worker, a cut stream)

    def to_json(self) -> dict:
        return asdict(self)


def shared_questions(instances: list[Instance], corpora: int, questions: int,
                     ) -> list[Instance]:
    """The first ``questions`` questions of each of the first ``corpora`` corpora."""
    by_corpus: dict[str, list[Instance]] = defaultdict(list)
    for instance in instances:
        if instance.corpus_id:
            by_corpus[instance.corpus_id].append(instance)
    chosen = [group[:questions] for group in list(by_corpus.values())[:corpora]
              if len(group) >= questions]
    if len(chosen) < corpora:
        raise ValueError(f"the dataset has {len(chosen)} corpora with at least {questions} "
                         f"questions each; asked for {corpora}")
    return [i for group in chosen for i in group]


def bench_fleet(
    fleet: Fleet, instances: list[Instance], system: str = "once:snapkv:0.5",
    policies: tuple[str, ...] = ("cache_aware", "round_robin", "manual"),
    new_tokens: int = 8, concurrency: int | None = None, seed: int = 0,
    on_step: Callable[[str], None] = lambda step: None,
) -> tuple[dict, list[FleetRow]]:
    """(settings, one row per arm: ``full`` behind cache_aware first). ``instances``:
    questions with corpus ids, asked in one seeded random order."""
    spec = parse_spec(system)
    order = list(instances)
    random.Random(seed).shuffle(order)
    concurrency = concurrency or len(fleet.workers)
    arms: list[tuple[CompressionSpec | None, str]] = [
        (None, "cache_aware"), *((spec, p) for p in policies)]
    rows: list[FleetRow] = []
    full: FleetRow | None = None
    settings: dict = {}
    for arm_spec, policy in arms:
        name = arm_spec.name if arm_spec else "full"
        on_step(f"{name} behind {policy}: flushing {len(fleet.workers)} workers")
        for worker in fleet.workers:
            worker.flush(fleet.api_key)
        with fleet.router(policy) as url:
            engine = SGLangURLEngine(url, fleet.model, api_key=fleet.api_key)
            prompts = {i.id: build_prompt(i) for i in order}
            spans = {i.id: engine.encode(prompts[i.id]).span for i in order}
            documents = {k: end - start for k, (start, end) in spans.items()}
            settings = settings or {
                "workers": len(fleet.workers), "concurrency": concurrency,
                "corpora": len({i.corpus_id for i in order}), "questions": len(order),
                "corpus_prefix_tokens_median": statistics.median(e for _, e in spans.values()),
                "pool_slots": [w.pool(fleet.api_key)["slots"] for w in fleet.workers],
                "order_seed": seed}
            empty = [w.pool(fleet.api_key)["used"] for w in fleet.workers]
            label = f"{name} behind {policy}"
            answers = _ask(engine, order, prompts, arm_spec, new_tokens, concurrency,
                           lambda k, label=label: on_step(f"{label}: {k}/{len(order)}"))
            held = [w.pool(fleet.api_key)["used"] for w in fleet.workers]
            row = _row(name, policy, order, answers, documents, held, empty, engine.resent,
                       full)
        rows.append(row)
        full = full or row
    return settings, rows


def _ask(engine: SGLangURLEngine, order: list[Instance], prompts: dict[str, Prompt],
         spec: CompressionSpec | None, new_tokens: int, concurrency: int,
         on_answer: Callable[[int], None]) -> dict[str, tuple[float, int]]:
    """Each question's (time to first token, prompt tokens its worker prefilled)."""
    jobs = ((i.id, prompts[i.id], spec) for i in order)
    answers = {}
    for key, generation in engine.generate_many(jobs, new_tokens, concurrency):
        cost = generation.cost
        answers[key] = (cost.prefill_s + cost.compress_s, cost.prefill_tokens)
        on_answer(len(answers))
    return answers


def _row(name: str, policy: str, order: list[Instance], answers: dict[str, tuple[float, int]],
         documents: dict[str, int], held_by_worker: list[int], empty: list[int], resent: int,
         full: FleetRow | None) -> FleetRow:
    built = {i.id: answers[i.id][1] >= documents[i.id] for i in order}
    first = {}
    for i in order:
        first.setdefault(i.corpus_id, i.id)
    follow = [i.id for i in order if first[i.corpus_id] != i.id]
    hits = sum(not built[q] for q in follow)
    ttft = statistics.median(answers[q][0] for q in follow) if follow else float("nan")
    held = sum(held_by_worker)
    builds = sum(built.values())
    return FleetRow(
        system=name, policy=policy, questions=len(order), builds=builds,
        builds_per_corpus=builds / len(first), hit_rate=hits / len(follow) if follow else 1.0,
        workers_used=sum(h > e for h, e in zip(held_by_worker, empty, strict=True)),
        slots_held=held,
        held_vs_full=held / full.slots_held if full else 1.0, ttft_s_median=ttft,
        ttft_vs_full=ttft / full.ttft_s_median if full else 1.0, resent=resent)


def fleet_logs(out: Path | None) -> Path:
    """Where the fleet's logs and stats go: beside ``--out``, else a temporary dir."""
    import tempfile

    return (out.parent / f"{out.stem}-logs") if out else Path(tempfile.mkdtemp("-kvrag-fleet"))
