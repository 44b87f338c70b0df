"""Prompts that fit the model: measure every prompt before any work, refuse or trim.

A prompt is measured with the chat template, as the engines encode it. Trimming caps an
instance as the study caps its own: non-gold documents are dropped, the last one first
(instances list documents in rank order where they have one), and never a gold document.
Every system then answers the same trimmed instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvrag.data.prompt import build_prompt, format_doc
from kvrag.data.schema import Instance
from kvrag.engines.chat import encode_prompt


class PromptTooLongError(ValueError):
    """Prompts over the limit, named with their lengths."""


@dataclass(frozen=True)
class PromptLimit:
    tokens: int  # most prompt tokens an instance may have
    reason: str  # where the limit comes from, for the error message


@dataclass(frozen=True)
class Fitted:
    instances: list[Instance]
    docs_dropped: dict[str, int]  # instance id -> documents dropped (trimmed ones only)


def context_length(model_path: str | Path) -> int | None:
    """The model's context length from its config, or None where the config has none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_limit(model_path: str | Path, model: str, max_new_tokens: int,
                 max_prompt_tokens: int | None) -> PromptLimit | None:
    """The tighter of the context length less the answer budget and ``max_prompt_tokens``."""
    limits = []
    length = context_length(model_path)
    if length is not None:
        limits.append(PromptLimit(length - max_new_tokens, (
            f"the context length {length:,} of {model} less --max-new-tokens {max_new_tokens}")))
    if max_prompt_tokens is not None:
        limits.append(PromptLimit(max_prompt_tokens, "--max-prompt-tokens"))
    if not limits:
        return None
    tightest = min(limits, key=lambda limit: limit.tokens)
    if tightest.tokens < 1:
        raise PromptTooLongError(f"no prompt fits: {tightest.reason} leaves "
                                 f"{tightest.tokens} tokens; lower --max-new-tokens")
    return tightest


def prompt_tokens(tokenizer, instance: Instance) -> int:
    return len(encode_prompt(tokenizer, build_prompt(instance)).input_ids)


def fit_instances(instances: Sequence[Instance], tokenizer, limit: PromptLimit,
                  trim: bool = False) -> Fitted:
    """``instances`` unchanged if every prompt fits; else trimmed (``trim``) or refused."""
    out: list[Instance] = []
    dropped: dict[str, int] = {}
    over: list[tuple[str, int]] = []
    for instance in instances:
        n = prompt_tokens(tokenizer, instance)
        if n <= limit.tokens:
            out.append(instance)
        elif not trim:
            over.append((instance.id, n))
        else:
            fitted, n = _trim(instance, n, tokenizer, limit.tokens)
            if n > limit.tokens:
                over.append((instance.id, n))
            out.append(fitted)
            dropped[instance.id] = len(instance.docs) - len(fitted.docs)
    if over:
        listed = ", ".join(f"{qid} ({n:,} tokens)" for qid, n in over[:10])
        more = f" and {len(over) - 10} more" if len(over) > 10 else ""
        what = ("even with only their gold documents " if trim else "")
        hint = ("" if trim else "; --fit-context drops non-gold documents until they fit")
        raise PromptTooLongError(
            f"{len(over)} of {len(instances)} prompts do not fit {what}in {limit.tokens:,} "
            f"tokens ({limit.reason}): {listed}{more}{hint}")
    return Fitted(out, dropped)


def fit_retrieved(instances: Sequence[Instance], tokenizer, limit: PromptLimit,
                  budget: int) -> Fitted:
    """``instances`` unchanged when only retrieval systems run: each prompt is its question
    and template plus at most ``budget`` tokens of chunks, so the question's documents
    (a whole shared corpus, for LOFT) are never measured."""
    over = []
    for instance in instances:
        n = prompt_tokens(tokenizer, replace(instance, docs=[])) + budget
        if n > limit.tokens:
            over.append((instance.id, n))
    if over:
        listed = ", ".join(f"{qid} ({n:,} tokens)" for qid, n in over[:10])
        raise PromptTooLongError(
            f"{len(over)} of {len(instances)} retrieval prompts (question, template and "
            f"{budget:,} tokens of chunks) do not fit in {limit.tokens:,} tokens "
            f"({limit.reason}): {listed}; lower the rag budget")
    return Fitted(list(instances), {})


def _trim(instance: Instance, n: int, tokenizer, limit: int) -> tuple[Instance, int]:
    """Drop non-gold documents from the end until the prompt fits: (instance, its length).

    Each document's own tokens estimate what dropping it saves; the prompt is measured
    again after each estimated fit, since numbering and token merges shift a little.
    """
    gold = set(instance.gold_doc_ids)
    docs = instance.docs
    droppable = [i for i in reversed(range(len(docs))) if docs[i].id not in gold]
    gone: set[int] = set()
    while n > limit and droppable:
        saved = 0
        while droppable and n - saved > limit:
            i = droppable.pop(0)
            gone.add(i)
            saved += len(tokenizer(format_doc(i + 1, docs[i]), add_special_tokens=False)
                         ["input_ids"])
        instance = replace(instance, docs=[d for i, d in enumerate(docs) if i not in gone])
        n = prompt_tokens(tokenizer, instance)
    return instance, n
