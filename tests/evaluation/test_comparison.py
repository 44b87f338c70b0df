"""The compare run's checks, without the CLI (tests/cli/test_compare.py runs it end to end)."""

from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from kvrag.evaluation.comparison import (
    CompareSettings,
    ComparisonError,
    parse_lengths,
    run_compare,
)

SETTINGS = CompareSettings(
    out=Path("unused"), dataset="demo", systems="full", model="smollm2", adapter=None,
    engine="hf", url=None, api_key=None, device="cpu", dtype="auto", limit=None, fmt="auto",
    max_new_tokens=4, seed=0, index_dir=None, chroma_url=None, chunk_tokens=128,
    embed_model=None, rag_order="score", max_prompt_tokens=None, concurrency=None,
    context_length=None, max_total_tokens=None, mem_fraction_static=None, tp_size=None,
    sglang_args=[], judge_url=None, judge_model=None, judge_api_key=None,
    context_tokens=None, fit_context=False)


def test_lengths_are_sorted_and_distinct():
    assert parse_lengths("4000, 1000,2000,1000,") == [1000, 2000, 4000]


@pytest.mark.parametrize(("text", "message"), [
    ("600,lots", "comma-separated token counts such as 1000,2000,4000, got '600,lots'"),
    ("0,100", "needs positive token counts, got '0,100'"),
    (",", "needs positive token counts"),
])
def test_bad_lengths_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lengths(text)


def refusal(tmp_path: Path, **changes) -> str:
    settings = replace(SETTINGS, out=tmp_path / "out", **changes)
    with pytest.raises(ComparisonError) as caught:
        run_compare(settings, Console(), lambda *a: pytest.fail("no progress expected"))
    assert not (tmp_path / "out").exists()
    return str(caught.value)


def test_an_unknown_engine_is_refused_before_any_work(tmp_path):
    assert refusal(tmp_path, engine="vllm") == \
        "unknown engine 'vllm'; available: hf, sglang, sglang-url"


def test_a_folder_without_adapter_config_is_no_adapter(tmp_path):
    assert refusal(tmp_path, adapter=tmp_path) == \
        f"{tmp_path} is not a PEFT adapter directory (no adapter_config.json)"


def test_sglang_options_need_the_sglang_engine(tmp_path):
    assert "need --engine sglang" in refusal(tmp_path, tp_size=2)
    assert refusal(tmp_path, engine="sglang-url", url="http://127.0.0.1:9", tp_size=2) == \
        "SGLang options are the server's: set them where it starts"


def test_a_sweep_refuses_a_prompt_limit_of_its_own(tmp_path):
    assert "leave out --max-prompt-tokens and --fit-context" in refusal(
        tmp_path, context_tokens="600", fit_context=True)
