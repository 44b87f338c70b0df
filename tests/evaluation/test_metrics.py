import pytest

from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance
from kvrag.evaluation.metrics import (
    cited_doc_ids,
    exact_match,
    extract_answer,
    extract_letter,
    normalize,
    score,
    substring_exact_match,
    token_f1,
)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("The answer is: Oslo", "Oslo"),
        ("Let me think.\nthe answer is Oslo, Norway.\nDone", "Oslo, Norway."),
        ("The answer is: Rome. Wait. The answer is: Oslo", "Oslo"),
        ("Oslo\nmore text", "Oslo"),
        ("", ""),
        ("The answer is:", ""),
    ],
)
def test_extract_answer(output: str, expected: str) -> None:
    assert extract_answer(output) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("B", "B"), ("(C)", "C"), ("D. kelp", "D"), ("Option A", "A"), ("b", None),
     ("E", None), ("", None), ("Because it eats moss", None), ("**B**", "B"),
     ("A lichen diet", None), ("B) kelp", "B"), ("C.", "C")],
)
def test_extract_letter(answer: str, expected: str | None) -> None:
    assert extract_letter(answer, 4) == expected


def test_squad_normalisation_and_scores() -> None:
    assert normalize("The  Oslo, Norway!") == "oslo norway"
    assert exact_match("the Oslo.", ["Oslo"]) == 1.0
    assert exact_match("Oslo Norway", ["Oslo"]) == 0.0
    assert substring_exact_match("It is Oslo, Norway", ["oslo"]) == 1.0
    assert substring_exact_match("Oslovakia", ["Oslo"]) == 0.0  # whole words only
    assert substring_exact_match("1240", ["124"]) == 0.0
    assert token_f1("Oslo Norway", ["Oslo"]) == pytest.approx(2 / 3)
    assert token_f1("Bergen", ["Oslo", "Bergen city"]) == pytest.approx(2 / 3)
    assert token_f1("", ["Oslo"]) == 0.0


def instance(task: str = "qa") -> Instance:
    return Instance(id="q", question="Where?", answers=["B"] if task == "mc" else ["Oslo"],
                    docs=[Doc("x", "X", "x"), Doc("y", "Y", "y"), Doc("z", "Z", "z")],
                    gold_doc_ids=["y", "z"], task=task,
                    choices=["a", "b", "c"] if task == "mc" else [])


def test_cited_ids_map_through_prompt_numbers() -> None:
    prompt = build_prompt(instance())
    assert cited_doc_ids("See [DOC 2] and [doc 3], [DOC 2], [DOC 9]", prompt) == ["y", "z"]


def test_score_open_question_with_citations() -> None:
    inst = instance()
    answer, s = score(inst, "[DOC 2][DOC 1] The answer is: oslo", build_prompt(inst))
    assert answer == "oslo"
    assert (s.subem, s.em, s.f1, s.accuracy) == (1.0, 1.0, 1.0, None)
    assert (s.cite_precision, s.cite_recall) == (0.5, 0.5)


def test_score_multiple_choice_scores_the_letter() -> None:
    inst = instance("mc")
    answer, s = score(inst, "The answer is: B. b", build_prompt(inst))
    assert answer == "B" and (s.subem, s.em, s.f1, s.accuracy) == (1, 1, 1, 1)
    _, wrong = score(inst, "The answer is: A", build_prompt(inst))
    assert wrong.accuracy == 0.0 and wrong.subem == 0.0
    by_text, s = score(inst, "It eats b, mostly.", build_prompt(inst))
    assert by_text == "B" and s.accuracy == 1.0
    _, ambiguous = score(inst, "b or c", build_prompt(inst))
    assert ambiguous.accuracy == 0.0
    _, none = score(inst, "I am not sure", build_prompt(inst))
    assert none.accuracy == 0.0 and none.cite_precision is None
