import pytest

from kvrag.evaluation.systems import SystemSpecError, parse_systems


def test_full_parses() -> None:
    assert [s.name for s in parse_systems("full")] == ["full"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("fulll", "unknown system 'fulll'; known systems: full"),
     ("full,full", "listed twice: full"),
     ("full,", "empty system name"),
     ("full:0.5", "'full' takes no parameter")],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(SystemSpecError, match=message):
        parse_systems(spec)


def test_once_systems_are_compressed_contexts_beside_per_question_ones() -> None:
    from kvrag.evaluation.systems import CompressedContext

    once, per_question = parse_systems("once:snapkv:0.5,snapkv:0.5")
    assert isinstance(once, CompressedContext) and once.spec.once
    assert once.name == "once:snapkv:0.5" and per_question.name == "snapkv:0.5"
    with pytest.raises(SystemSpecError, match="nothing to compress once"):
        parse_systems("once:retrieval:0.5")


def test_method_options_are_part_of_the_system_and_its_name() -> None:
    systems = parse_systems("full,snapkv[window=32;chunk=16]:0.5,snapkv:0.5,"
                            "once:tova[heads=shared]@64")
    assert [s.name for s in systems] == ["full", "snapkv[chunk=16;window=32]:0.5",
                                         "snapkv:0.5", "once:tova[heads=shared]@64"]
    assert systems[1].spec.chunk == 16 and systems[1].spec.build().window == 32
    with pytest.raises(SystemSpecError, match="listed twice"):
        parse_systems("snapkv[chunk=16;window=32]:0.5,snapkv[window=32;chunk=16]:0.5")
    with pytest.raises(SystemSpecError, match="unknown option 'size' for snapkv"):
        parse_systems("snapkv[size=3]:0.5")


def test_rag_systems_name_their_retriever() -> None:
    systems = parse_systems("rag:1024,rag[retriever=bm25]:1024,rag[retriever=hybrid]:512")
    assert [s.name for s in systems] == ["rag:1024", "rag[retriever=bm25]:1024",
                                         "rag[retriever=hybrid]:512"]
    assert [s.retriever for s in systems] == ["dense", "bm25", "hybrid"]
    with pytest.raises(SystemSpecError, match="listed twice: rag:64"):
        parse_systems("rag:64,rag[retriever=dense]:64")


@pytest.mark.parametrize("spec", ["rag[retriever=colbert]:64", "rag[k=3]:64", "rag:0",
                                  "rag[retriever=bm25]", "rag[retriever]:64"])
def test_bad_rag_specs_say_what_is_allowed(spec: str) -> None:
    with pytest.raises(SystemSpecError, match="R one of dense, bm25, hybrid|key=value"):
        parse_systems(spec)
