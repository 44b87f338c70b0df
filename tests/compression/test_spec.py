import pytest

from kvrag.compression import CompressionSpec, SpecError, parse_spec, split_specs
from kvrag.compression.snapkv import SnapKV


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


def test_options_build_the_method_and_name_the_system() -> None:
    spec = parse_spec(" snapkv[ window=32 ; kernel=7 ]:0.50")
    assert spec.build() == SnapKV(window=32, kernel=7)
    assert spec.name == "snapkv[kernel=7;window=32]:0.5"  # keys sorted: one name per spec
    assert parse_spec(spec.name) == spec
    chunked = parse_spec("once:pyramidkv[heads=shared;chunk=16;beta=10]@300")
    assert chunked.once and chunked.budget == 300 and chunked.build().beta == 10.0
    assert chunked.chunk == 16 and chunked.shared_heads
    assert chunked.name == "once:pyramidkv[beta=10.0;chunk=16;heads=shared]@300"
    assert parse_spec("knorm[chunk=Sentence]:0.5").chunk == "sentence"
    assert parse_spec("tova[heads=per-head]:0.5").shared_heads is False
    assert parse_spec("snapkv:0.5").chunk is None and parse_spec("snapkv:0.5").options == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [("snapkv[windw=32]:0.5", "unknown option 'windw' for snapkv"),
     ("snapkv[window=big]:0.5", "window='big' is not allowed"),
     ("snapkv[kernel=4]:0.5", "an odd kernel"),
     ("snapkv[chunk=0]:0.5", "chunk='0' is not allowed"),
     ("tova[heads=some]:0.5", "heads='some' is not allowed"),
     ("knorm[window=3]:0.5", "unknown option 'window' for knorm"),
     ("snapkv[chunk=4;chunk=8]:0.5", "given twice"),
     ("snapkv[chunk]:0.5", "cannot read option 'chunk'"),
     ("snapkv[chunk=4:0.5", "unclosed '['"),
     ("retrieval[chunk=4]:0.5", "takes no chunk or heads")],
)
def test_bad_options_are_refused_naming_the_allowed_ones(text: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert message in str(err.value)
    if "unknown option" in message or "not allowed" in message:
        assert "chunk (a whole number of tokens >= 1, or 'sentence')" in str(err.value)


def test_lists_split_on_commas_outside_brackets() -> None:
    assert split_specs("full, snapkv[window=32;chunk=16]:0.5 ,rag:1024") == [
        "full", "snapkv[window=32;chunk=16]:0.5", "rag:1024"]


def test_recall_after_names_itself_and_is_bounded() -> None:
    spec = parse_spec("once:snapkv[heads=shared]:0.9+recall[after=0]@128")
    assert spec.recall.after == 0 and parse_spec(spec.name) == spec
    assert "after=0" in spec.name
    default = parse_spec("once:snapkv[heads=shared]:0.9+recall@128")
    assert (default.recall.chunk, default.recall.after) == (8, 2) and default == parse_spec(
        "once:snapkv[heads=shared]:0.9+recall[chunk=8;after=2]@128")
    assert default.name == "once:snapkv[heads=shared]:0.9+recall@128"
    with pytest.raises(SpecError, match="after is 0 to 4 chunks"):
        parse_spec("once:snapkv[heads=shared]:0.9+recall[after=5]@128")


def test_recall_specs_name_their_budget_and_read_back() -> None:
    spec = parse_spec("once:snapkv[heads=shared;chunk=16]:0.75+recall@256")
    assert spec.recall is not None and spec.recall.tokens == 256 and spec.recall.reprefill
    assert spec.name == "once:snapkv[chunk=16;heads=shared]:0.75+recall@256"
    assert parse_spec(spec.name) == spec
    share = parse_spec("once:knorm[heads=shared]@64+recall[reprefill=0;chunk=16]:0.25")
    assert share.recall.share == 0.25 and share.recall.chunk == 16
    assert "chunk=16" in share.name
    assert not share.recall.reprefill and parse_spec(share.name) == share
    assert share.recall.budget(n_doc=1000, n_evicted=936) == 250
    assert spec.recall.budget(n_doc=1000, n_evicted=100) == 100  # no more than was evicted
    narrow = parse_spec("once:snapkv[heads=shared]:0.5+recall[window=24]@8")
    assert narrow.recall.window == 24 and parse_spec(narrow.name) == narrow


@pytest.mark.parametrize(
    ("text", "message"),
    [("snapkv[heads=shared]:0.5+recall@64", "write once:snapkv[heads=shared]:0.5+recall"),
     ("once:snapkv:0.5+recall@64", "add heads=shared"),
     ("once:pyramidkv[heads=shared]:0.5+recall@64", "one count for every layer"),
     ("once:snapkv[heads=shared]:0.5+recall", "give exactly one recall budget"),
     ("once:snapkv[heads=shared]:0.5+recall:1.5", "out of range"),
     ("once:snapkv[heads=shared]:0.5+recall[depth=2]@8", "unknown +recall option 'depth'"),
     ("once:snapkv[heads=shared]:0.5+recall[reprefill=2]@8", "reprefill is 0 or 1"),
     ("once:snapkv[heads=shared]:0.5+recall[window=80]@8", "window is 1 to 64")],
)
def test_impossible_recall_specs_say_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("+", r"\+")):
        parse_spec(text)
