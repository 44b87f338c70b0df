import re

import pytest

from kvrag.data.demo import DEMO_PATH
from kvrag.data.prompt import build_prompt, format_doc
from kvrag.data.schema import Doc, Instance, read_jsonl
from kvrag.evaluation.metrics import cited_doc_ids, extract_answer, score
from kvrag.train.formats import (
    FORMATS,
    FormatError,
    build_target,
    count_words,
    quote_span,
    sentence_spans,
)

PERSON = Doc("p", "Ada Lark", "Ada Lark is an inventor from the town of Rome. "
             "In 1901, Ada founded Lark Works. She liked tea.")
COMPANY = Doc("c", "Lark Works", "Lark Works makes kites. Its headquarters are in Oslo.")
OTHER = Doc("x", "Bo Finch", "Bo Finch was a weaver born in Rome.")
TWO_HOP = Instance(
    id="q1", question="In which town is the company founded by Ada Lark headquartered?",
    answers=["Oslo"], docs=[PERSON, COMPANY, OTHER], gold_doc_ids=["p", "c"],
)
PLACED = [(1, OTHER), (2, COMPANY), (3, PERSON)]
FROG = Doc("f", "The frog", "The frog lives in bogs. The frog eats moss spores daily.")
MC = Instance(
    id="q2", question="What does the frog eat?", answers=["B"], docs=[OTHER, FROG],
    gold_doc_ids=["f"], task="mc", choices=["kelp", "moss spores", "figs"],
)
NO_GOLD = Instance(id="helmet-7", question="Who?", answers=["Bo"], docs=[OTHER],
                   gold_doc_ids=[])


@pytest.mark.parametrize(
    ("fmt", "instance", "placed", "expected"),
    [
        ("answer", TWO_HOP, PLACED, "The answer is: Oslo"),
        ("ids", TWO_HOP, PLACED, "Relevant documents: [DOC 2], [DOC 3]\nThe answer is: Oslo"),
        ("ids+quotes", TWO_HOP, PLACED,
         'Relevant documents: [DOC 2], [DOC 3]\nQuotes:\n'
         '[DOC 2] "Its headquarters are in Oslo."\n'
         '[DOC 3] "In 1901, Ada founded Lark Works."\n'  # the bridge: it names [DOC 2]
         'The answer is: Oslo'),
        ("ids+copy", TWO_HOP, PLACED,
         "Relevant documents: [DOC 2], [DOC 3]\nCopied documents:\n"
         f"[DOC 2] Lark Works\n{COMPANY.text}\n\n[DOC 3] Ada Lark\n{PERSON.text}\n\n"
         "The answer is: Oslo"),
        ("answer", MC, [(1, OTHER), (2, FROG)], "The answer is: B"),
        ("ids+quotes", MC, [(1, FROG), (2, OTHER)],
         'Relevant documents: [DOC 1]\nQuotes:\n[DOC 1] "The frog eats moss spores daily."\n'
         'The answer is: B'),
    ],
)
def test_target_text(fmt: str, instance: Instance, placed, expected: str) -> None:
    assert build_target(fmt, instance, placed, count_words) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A b. C d!\nE", ["A b.", "C d!", "E"]),
        ("  x  ", ["x"]),
        ("", []),
        ("It is 3.5 m. Next one", ["It is 3.5 m.", "Next one"]),
        ("| Q1 | 5 |\n| Q2 | 7 |", ["| Q1 | 5 |", "| Q2 | 7 |"]),
    ],
)
def test_sentence_spans(text: str, expected: list[str]) -> None:
    assert [text[a:b] for a, b in sentence_spans(text)] == expected


WORDS = [f"w{i}" for i in range(50)]
WORDS[20] = "Oslo"
LONG = " ".join(WORDS)


@pytest.mark.parametrize(
    ("text", "evidence", "count_tokens", "expected"),
    [
        # 50 words: grow right then left around "Oslo" (word 20) up to 30 words
        (LONG, ["Oslo"], count_words, " ".join(WORDS[6:36])),
        # two tokens a word: 15 words, the window grows right first
        (LONG, ["Oslo"], lambda t: 2 * len(t.split()), " ".join(WORDS[13:28])),
        # evidence at the very start: the window can only grow right
        (" ".join(["Oslo", *WORDS[21:], *WORDS[:20]]), ["Oslo"], count_words,
         " ".join(["Oslo", *WORDS[21:]])),
        # evidence absent: the sentence sharing most hint words ("frog", "eat")
        ("It is green. A frog must eat. The end.", ["kelp"], count_words, "A frog must eat."),
        ("", ["Oslo"], count_words, ""),
        ("Oslo", ["Oslo"], lambda t: 99, ""),  # not even one word fits
    ],
)
def test_quote_span(text: str, evidence: list[str], count_tokens, expected: str) -> None:
    assert quote_span(text, evidence, "What does the frog eat?", count_tokens) == expected


@pytest.fixture(scope="module")
def demo_sample() -> list[Instance]:
    shipped = read_jsonl(DEMO_PATH)
    return shipped[:8] + [TWO_HOP, MC]  # two of each demo task, plus the hand-made ones


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_target_round_trips_through_evaluation(fmt: str, demo_sample) -> None:
    for inst in demo_sample:
        placed = list(enumerate(reversed(inst.docs), start=1))
        prompt = build_prompt(inst, placed)
        target = build_target(fmt, inst, placed, count_words)
        assert extract_answer(target) == inst.answers[0], (fmt, inst.id)
        assert score(inst, target, prompt)[1].subem == 1.0, (fmt, inst.id)
        cited = sorted(cited_doc_ids(target, prompt))
        assert cited == ([] if fmt == "answer" else sorted(inst.gold_doc_ids)), (fmt, inst.id)


@pytest.mark.parametrize("count_tokens", [count_words, lambda t: 2 * len(t.split())])
def test_quotes_are_short_and_verbatim(count_tokens, demo_sample) -> None:
    for inst in demo_sample:
        placed = list(enumerate(inst.docs, start=1))
        target = build_target("ids+quotes", inst, placed, count_tokens)
        by_number = dict(placed)
        quotes = [line for line in target.splitlines() if line.startswith("[DOC")]
        assert len(quotes) == len(inst.gold_doc_ids), inst.id
        for line in quotes:
            tag, quote = line.split(" ", 2)[1].rstrip("]"), line.split('"', 1)[1][:-1]
            assert quote and quote in by_number[int(tag)].text, (inst.id, quote)
            assert count_tokens(quote) <= 30, (inst.id, quote)


def test_copy_equals_the_prompt_blocks(demo_sample) -> None:
    for inst in demo_sample:
        placed = list(enumerate(inst.docs, start=1))
        target = build_target("ids+copy", inst, placed, count_words)
        gold = [(n, d) for n, d in placed if d.id in inst.gold_doc_ids]
        copied = target.split("Copied documents:\n", 1)[1].rsplit("The answer is:", 1)[0]
        assert copied == "".join(format_doc(n, d) for n, d in gold), inst.id
        for _, doc in gold:
            assert f"\n{doc.text}\n" in copied


@pytest.mark.parametrize("fmt", ["ids", "ids+quotes", "ids+copy"])
def test_citing_formats_need_gold_ids(fmt: str) -> None:
    placed = list(enumerate(NO_GOLD.docs, start=1))
    message = f"instance 'helmet-7' has no gold_doc_ids, but format '{fmt}' cites"
    with pytest.raises(FormatError, match=re.escape(message)):
        build_target(fmt, NO_GOLD, placed, count_words)


def test_answer_format_needs_no_gold_ids() -> None:
    assert build_target("answer", NO_GOLD, [(1, OTHER)], count_words) == "The answer is: Bo"


def test_gold_doc_left_out_of_the_prompt_is_an_error() -> None:
    with pytest.raises(FormatError, match=r"'q1': gold docs \['p'\] are not in the prompt"):
        build_target("ids", TWO_HOP, [(1, COMPANY)], count_words)


def test_unknown_format_lists_the_known_ones() -> None:
    with pytest.raises(FormatError, match=r"'cot'.*'answer', 'ids', 'ids\+copy', 'ids\+quotes'"):
        build_target("cot", TWO_HOP, PLACED, count_words)
