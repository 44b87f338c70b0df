"""Run every system on the identical question list, storing each answer as it lands."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from kvrag.data.schema import Instance
from kvrag.engines.base import Engine, Generation
from kvrag.evaluation.judge import Judge, JudgeCase
from kvrag.evaluation.metrics import TASK_METRICS, score
from kvrag.evaluation.store import ResultStore
from kvrag.evaluation.systems import System


def pending(
    instances: Sequence[Instance], systems: Sequence[System], store: ResultStore
) -> list[tuple[Instance, System]]:
    """The (question, system) pairs not yet in the store, question-major, with the
    questions over one corpus together (in first-seen order), so an engine that keeps a
    corpus's cache (``once:`` systems) builds it once."""
    done = store.done()
    order: dict[str, int] = {}
    for i in instances:
        order.setdefault(i.corpus_id, len(order))
    grouped = sorted(instances, key=lambda i: order[i.corpus_id])  # stable
    return [(i, s) for i in grouped for s in systems if (i.id, s.name) not in done]


def run_comparison(
    work: Sequence[tuple[Instance, System]],
    engine: Engine,
    store: ResultStore,
    max_new_tokens: int,
    on_answer: Callable[[dict], None] = lambda record: None,
    docs_dropped: Mapping[str, int] | None = None,
    concurrency: int = 1,
    judge: Judge | None = None,
) -> None:
    """Answer each pair and store it the moment it lands.

    ``concurrency`` > 1 keeps that many requests in flight on an engine that batches
    (``generate_many``); answers then land in completion order. ``docs_dropped``:
    documents trimmed per instance id, recorded with its answers. ``judge`` rates every
    output the same way, shown the documents it cites from its own prompt
    (``scores.judge``).
    """
    if concurrency > 1:
        jobs = ((i, s, s.request(i, engine)) for i, s in work)
        results = engine.generate_many(((job, job[2].prompt, job[2].compression)
                                        for job in jobs), max_new_tokens, concurrency)
    else:
        results = _one_at_a_time(work, engine, max_new_tokens)
    for (instance, system, request), generation in results:
        extracted, scores = score(instance, generation.text, request.prompt,
                                  generation.truncated)
        if judge is not None:
            scores = scores.with_judge(judge(JudgeCase.of(instance, request.prompt,
                                                          generation.text)))
        record = {
            "id": instance.id, "group": instance.group, "task": instance.task,
            "metric": TASK_METRICS[instance.task],
            "corpus": instance.corpus_id,
            "system": system.name, "output": generation.text, "answer": extracted.text,
            "answer_from": extracted.source, "truncated": generation.truncated,
            "golds": instance.answers, "scores": scores.to_json(),
            "cost": generation.cost.to_json(),
            "docs_dropped": (docs_dropped or {}).get(instance.id, 0), **request.extra,
        }
        store.append(record)
        on_answer(record)


def _one_at_a_time(work: Sequence[tuple[Instance, System]], engine: Engine,
                   max_new_tokens: int) -> Iterator[tuple[tuple, Generation]]:
    """Answers in order; the engine drops what it kept for a question's prompt (the HF
    engine's prefill) as soon as the question's last system is served."""
    for k, (instance, system) in enumerate(work):
        request = system.request(instance, engine)
        generation = engine.generate(request.prompt, max_new_tokens,
                                     compression=request.compression)
        if k + 1 == len(work) or work[k + 1][0].id != instance.id:
            engine.release()
        yield (instance, system, request), generation
