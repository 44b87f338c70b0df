import pytest

from kvrag.data.schema import Doc, Instance
from kvrag.evaluation.prompt_fit import (
    PromptLimit,
    PromptTooLongError,
    context_length,
    fit_instances,
    prompt_limit,
    prompt_tokens,
)


def instance(qid: str, n_docs: int, gold: list[int]) -> Instance:
    docs = [Doc(f"d{i}", f"Doc {i}", f"Fact number {i} is about the river. " * 20)
            for i in range(n_docs)]
    return Instance(id=qid, question="Which fact?", answers=["x"], docs=docs,
                    gold_doc_ids=[f"d{i}" for i in gold])


def test_prompts_that_fit_are_left_alone(smollm2_tokenizer) -> None:
    short = instance("q1", 2, [0])
    fitted = fit_instances([short], smollm2_tokenizer, PromptLimit(10_000, "test"))
    assert fitted.instances == [short] and fitted.docs_dropped == {}


def test_over_long_prompts_are_refused_with_ids_and_lengths(smollm2_tokenizer) -> None:
    long, short = instance("long", 12, [3]), instance("short", 1, [0])
    n = prompt_tokens(smollm2_tokenizer, long)
    limit = PromptLimit(n - 1, "--max-prompt-tokens")
    with pytest.raises(PromptTooLongError, match=(
            rf"1 of 2 prompts do not fit in {n - 1:,} tokens \(--max-prompt-tokens\): "
            rf"long \({n:,} tokens\); --fit-context")):
        fit_instances([long, short], smollm2_tokenizer, limit)


def test_fitting_drops_non_gold_documents_from_the_end_never_a_gold_one(
        smollm2_tokenizer) -> None:
    long = instance("long", 12, [3, 11])
    n = prompt_tokens(smollm2_tokenizer, long)
    limit = PromptLimit(n // 2, "test")
    fitted = fit_instances([long], smollm2_tokenizer, limit, trim=True)
    [trimmed] = fitted.instances
    kept = [d.id for d in trimmed.docs]
    assert prompt_tokens(smollm2_tokenizer, trimmed) <= n // 2
    assert {"d3", "d11"} <= set(kept)
    assert fitted.docs_dropped == {"long": 12 - len(kept)} and len(kept) < 12
    non_gold = [f"d{i}" for i in range(12) if i not in (3, 11)]
    kept_non_gold = [d for d in kept if d in non_gold]
    assert kept_non_gold == non_gold[:len(kept_non_gold)]  # the last ones went first
    assert kept == [f"d{i}" for i in range(12) if f"d{i}" in kept]  # order unchanged


def test_gold_documents_alone_too_long_is_refused(smollm2_tokenizer) -> None:
    gold_only = instance("all-gold", 4, [0, 1, 2, 3])
    limit = PromptLimit(prompt_tokens(smollm2_tokenizer, gold_only) - 1, "test")
    with pytest.raises(PromptTooLongError, match="even with only their gold documents"):
        fit_instances([gold_only], smollm2_tokenizer, limit, trim=True)


def test_the_limit_is_the_context_less_the_answer_budget(tiny_model_dir) -> None:
    assert context_length(tiny_model_dir) == 8192
    limit = prompt_limit(tiny_model_dir, "tiny", 64, None)
    assert limit is not None and limit.tokens == 8192 - 64
    assert "context length 8,192 of tiny" in limit.reason
    assert prompt_limit(tiny_model_dir, "tiny", 64, 3000) == PromptLimit(
        3000, "--max-prompt-tokens")
    with pytest.raises(PromptTooLongError, match="lower --max-new-tokens"):
        prompt_limit(tiny_model_dir, "tiny", 9000, None)
