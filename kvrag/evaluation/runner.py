"""Run every system on the identical question list, storing each answer as it lands."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from kvrag.data.schema import Instance
from kvrag.engines.base import Engine
from kvrag.evaluation.metrics import score
from kvrag.evaluation.store import ResultStore
from kvrag.evaluation.systems import System


def pending(
    instances: Sequence[Instance], systems: Sequence[System], store: ResultStore
) -> list[tuple[Instance, System]]:
    """The (question, system) pairs not yet in the store, question-major."""
    done = store.done()
    return [(i, s) for i in instances for s in systems if (i.id, s.name) not in done]


def run_comparison(
    work: Sequence[tuple[Instance, System]],
    engine: Engine,
    store: ResultStore,
    max_new_tokens: int,
    on_answer: Callable[[dict], None] = lambda record: None,
    docs_dropped: Mapping[str, int] | None = None,
) -> None:
    """Answer each pair and store it; ``docs_dropped``: documents trimmed per instance id,
    recorded with its answers."""
    for instance, system in work:
        result = system.answer(instance, engine, max_new_tokens)
        generation = result.generation
        extracted, scores = score(instance, generation.text, result.prompt,
                                  generation.truncated)
        record = {
            "id": instance.id, "group": instance.group, "task": instance.task,
            "system": system.name, "output": generation.text, "answer": extracted.text,
            "answer_from": extracted.source, "truncated": generation.truncated,
            "golds": instance.answers, "scores": scores.to_json(),
            "cost": result.generation.cost.to_json(),
            "docs_dropped": (docs_dropped or {}).get(instance.id, 0), **result.extra,
        }
        store.append(record)
        on_answer(record)
