from kvrag.data.prompt import ANSWER_MARKER, build_prompt
from kvrag.data.schema import Doc, Instance


def make(task: str = "qa") -> Instance:
    return Instance(
        id="q", question="Where was Ann born?", answers=["A"] if task == "mc" else ["Oslo"],
        docs=[Doc("x", "Bob", "Bob was born in Rome."), Doc("y", "Ann", "Ann was born in Oslo.")],
        gold_doc_ids=["y"], task=task, choices=["Oslo", "Rome"] if task == "mc" else [],
    )


def test_documents_then_question_then_instructions() -> None:
    p = build_prompt(make())
    assert "[DOC 1] Bob\nBob was born in Rome." in p.context
    assert "[DOC 2] Ann\nAnn was born in Oslo." in p.context
    assert p.text.index("[DOC 2]") < p.text.index("Question: Where was Ann born?")
    assert p.query.rstrip().endswith(f"{ANSWER_MARKER} <answer>")
    assert [m["role"] for m in p.messages()] == ["system", "user"]
    assert p.messages()[1]["content"] == p.text
    start, end = p.context_span
    assert p.text[start:end] == p.context
    assert p.doc_tags == {1: "x", 2: "y"}


def test_multiple_choice_lists_lettered_choices_and_asks_for_a_letter() -> None:
    p = build_prompt(make("mc"))
    assert "A. Oslo\nB. Rome\n" in p.query
    assert "<letter>" in p.query


def test_subset_keeps_original_doc_numbers() -> None:
    inst = make()
    p = build_prompt(inst, docs=[(2, inst.docs[1])])
    assert p.context.startswith("[DOC 2] Ann")
    assert "[DOC 1]" not in p.text
    assert p.doc_tags == {2: "y"}
