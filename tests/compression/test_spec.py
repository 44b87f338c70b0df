import pytest

from kvrag.compression import CompressionSpec, SpecError, parse_spec


@pytest.mark.parametrize(
    ("text", "n_doc", "kept"),
    [("snapkv:0.5", 2000, 1000), ("snapkv:0", 2000, 2000), ("knorm:0.75", 1001, 250),
     ("random:0.9", 10, 1), ("streamingllm@512", 2000, 512), ("h2o@5000", 2000, 2000)],
)
def test_kept_counts_match_the_spec_exactly(text: str, n_doc: int, kept: int) -> None:
    assert parse_spec(text).kept(n_doc) == kept


def test_names_are_canonical() -> None:
    assert parse_spec("snapkv:0.50").name == "snapkv:0.5"
    assert parse_spec(" tova@256 ").name == "tova@256"


@pytest.mark.parametrize(
    ("text", "message"),
    [("snapkv:1", "ratio 1.0 is out of range"), ("snapkv:-0.1", "out of range"),
     ("snapkv@0", "budget 0 is out of range"), ("nope:0.5", "unknown compression method"),
     ("snapkv:half", "cannot read 'half'"), ("snapkv", "has no ratio or budget"),
     ("snapkv@1.5", "cannot read '1.5'")],
)
def test_invalid_specs_list_methods_and_ranges(text: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert message in str(err.value)
    assert "0 <= RATIO < 1" in str(err.value) and "snapkv, streamingllm, tova" in str(err.value)


def test_exactly_one_of_ratio_or_budget() -> None:
    with pytest.raises(SpecError, match="exactly one"):
        CompressionSpec("snapkv", ratio=0.5, budget=10)


def test_once_specs_name_their_sharing_and_refuse_what_cannot_share() -> None:
    spec = parse_spec(" once:snapkv:0.50 ")
    assert spec.once and spec.name == "once:snapkv:0.5" and spec.kept(2000) == 1000
    assert parse_spec(spec.name) == spec
    assert parse_spec("once:knorm@64").name == "once:knorm@64"
    assert not parse_spec("snapkv:0.5").once
    with pytest.raises(SpecError, match="nothing to compress once"):
        parse_spec("once:retrieval:0.5")
    with pytest.raises(SpecError, match="ratio 1.0 is out of range"):
        parse_spec("once:snapkv:1")
