import pytest

from kvrag.engines.sglang_options import SGLangOptions, parse_sglang_args


def test_named_and_passed_through_options_become_engine_kwargs() -> None:
    options = SGLangOptions(context_length=32768, tp_size=2, extra=parse_sglang_args(
        ["chunked-prefill-size=4096", "--enable-metrics=", "schedule-policy=lpm"]))
    assert options.engine_kwargs() == {"context_length": 32768, "tp_size": 2,
                                       "chunked_prefill_size": 4096, "enable_metrics": True,
                                       "schedule_policy": "lpm"}


def test_bad_sglang_args_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="use KEY=VALUE"):
        parse_sglang_args(["chunked-prefill-size"])
    with pytest.raises(ValueError, match="SGLang has no option --no-such-flag"):
        SGLangOptions(extra=parse_sglang_args(["no-such-flag=1"])).engine_kwargs()
