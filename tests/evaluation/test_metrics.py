import pytest

from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance
from kvrag.evaluation.metrics import (
    TASK_METRICS,
    Extraction,
    cited_doc_ids,
    exact_match,
    extract,
    extract_answer,
    extract_letter,
    normalize,
    rouge_l,
    score,
    substring_exact_match,
    task_score,
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


# Outputs shaped like SmolLM2's on the demo and needle suites, with and without a cut at
# the token limit (truncated=True).
@pytest.mark.parametrize(
    ("output", "truncated", "expected", "source"),
    [
        ("The answer is: Dolores Park.", False, "Dolores Park.", "marker"),
        ("The answer is: Dolores Park.", True, "Dolores Park.", "marker"),  # nothing before
        ("People sit in Dolores Park on a sunny day. The answer is:", True,
         "People sit in Dolores Park on a sunny day.", "before_marker"),
        ("People sit in Dolores Park on a sunny day.\n\nThe answer is:", False,
         "People sit in Dolores Park on a sunny day.", "before_marker"),
        ("... sit in Dolores Park on a sunny day. The answer is: The best thing to do", True,
         "... sit in Dolores Park on a sunny day.", "before_marker"),
        ("... sit in Dolores Park on a sunny day. The answer is: The best thing to do", False,
         "The best thing to do", "marker"),
        ("The answer is: Dolores Park.\nThe answer is: Dolores", True, "Dolores Park.",
         "earlier_marker"),
        ("The answer is: Dolores Park.\nThe answer is:", False, "Dolores Park.",
         "earlier_marker"),
        ("Intro.\nThe answer is:\nThe answer is: Dol", True, "Intro.", "before_marker"),
        ("The answer is: Oslo\nBecause [DOC 2] says", True, "Oslo", "marker"),  # line ended
        ("Not Bergen. The answer is: Oslo\n", True, "Oslo", "marker"),
        ("Not Bergen. The answer is: Oslo.", True, "Oslo.", "marker"),  # sentence ended
        ("Not Bergen. The answer is: Oslo", True, "Not Bergen.", "before_marker"),
        ("It is in Oslo, I think, because [DOC", True, "It is in Oslo, I think, because [DOC",
         "no_marker"),
        ("Oslo\nThe answer i", True, "Oslo", "no_marker"),  # the marker itself was cut
        ("", True, "", "no_marker"),
    ],
)
def test_extraction_survives_a_cut(output: str, truncated: bool, expected: str,
                                   source: str) -> None:
    assert extract(output, truncated) == Extraction(expected, source)


def test_cut_repetition_scores_the_answer_given_before_it() -> None:
    inst = Instance(id="q", question="Where?", answers=["Dolores Park"],
                    docs=[Doc("x", "X", "x")], gold_doc_ids=["x"])
    output = "Sit in Dolores Park on a sunny day. The answer is: The best thing to do"
    cut, scores = score(inst, output, build_prompt(inst), truncated=True)
    assert cut.source == "before_marker" and scores.subem == 1.0
    uncut, plain = score(inst, output, build_prompt(inst), truncated=False)
    assert uncut.text == "The best thing to do" and plain.subem == 0.0
    assert plain.subem_output == scores.subem_output == 1.0  # the whole output has it


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
    assert answer == Extraction("oslo", "marker")
    assert (s.subem, s.subem_output, s.em, s.f1, s.accuracy) == (1.0, 1.0, 1.0, 1.0, None)
    _, wrong = score(inst, "Oslo or Bergen? The answer is: Bergen", build_prompt(inst))
    assert (wrong.subem, wrong.subem_output, wrong.em) == (0.0, 1.0, 0.0)
    assert (s.cite_precision, s.cite_recall) == (0.5, 0.5)


def test_score_multiple_choice_scores_the_letter() -> None:
    inst = instance("mc")
    answer, s = score(inst, "The answer is: B. b", build_prompt(inst))
    assert answer.text == "B" and (s.subem, s.subem_output, s.em, s.f1, s.accuracy) == (
        1, 1, 1, 1, 1)
    _, wrong = score(inst, "The answer is: A", build_prompt(inst))
    assert wrong.accuracy == 0.0 and wrong.subem == 0.0
    by_text, s = score(inst, "It eats b, mostly.", build_prompt(inst))
    assert by_text == Extraction("B", "no_marker") and s.accuracy == 1.0
    _, ambiguous = score(inst, "b or c", build_prompt(inst))
    assert ambiguous.accuracy == 0.0
    _, none = score(inst, "I am not sure", build_prompt(inst))
    assert none.accuracy == 0.0 and none.cite_precision is None


def test_a_letter_at_the_token_limit_is_whole() -> None:
    inst = instance("mc")
    prompt = build_prompt(inst)
    letter, s = score(inst, "Not A, it eats b. The answer is: B", prompt, truncated=True)
    assert letter == Extraction("B", "marker") and s.accuracy == 1.0
    cut, s = score(inst, "It eats b, so B. The answer is: Option", prompt, truncated=True)
    assert cut == Extraction("B", "before_marker") and s.accuracy == 1.0


def test_a_summary_is_the_whole_output_scored_by_rouge_l() -> None:
    inst = Instance("s", "Summarize the book.", ["the fox jumped over the sleeping dog"],
                    [Doc("p1", "", "A fox. A dog.")], [], task="sum")
    prompt = build_prompt(inst)
    answer, s = score(inst, "The fox jumped over a dog.\nThe end.", prompt)
    assert answer == Extraction("The fox jumped over a dog.\nThe end.", "whole")
    assert (s.subem, s.em, s.f1, s.accuracy) == (None, None, None, None)
    # LCS "the fox jumped over dog" = 5 of 7 reference and 8 predicted tokens
    assert s.rouge_l == pytest.approx(2 * (5 / 8) * (5 / 7) / (5 / 8 + 5 / 7))
    _, best = score(inst, "the fox jumped over the sleeping dog", prompt)
    assert best.rouge_l == pytest.approx(1.0)
    assert rouge_l("jumping foxes", ["foxes jumped"]) == pytest.approx(0.5)  # stemmed


def test_each_task_declares_its_metric() -> None:
    assert TASK_METRICS == {"qa": "subem", "mc": "accuracy", "sum": "rouge_l"}
    record = {"task": "sum", "scores": {"subem": None, "rouge_l": 0.4}}
    assert task_score(record) == 0.4
    assert task_score({"task": "mc", "scores": {"subem": 1.0, "accuracy": 0.0}}) == 0.0
