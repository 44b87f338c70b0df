import re

import pytest

from kvrag.data.demo import DEMO_PATH
from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance, read_jsonl
from kvrag.train.examples import build_examples
from kvrag.train.formats import FormatError, count_words
from kvrag.train.rewards import REWARDS, get_reward, judge_reward

A = Doc("a", "Ada Lark", "Ada Lark was born in Oslo. She played the oboe.")
FJORDS = " ".join(["fjord"] * 35)
B = Doc("b", "Oslo", f"Oslo is by the sea. {FJORDS}.")
C = Doc("c", "Bo Finch", "Bo Finch was born in Rome.")
INST = Instance(id="q1", question="Where was Ada Lark born?", answers=["Oslo"],
                docs=[A, B, C], gold_doc_ids=["a", "b"])
PROMPT = build_prompt(INST, [(1, C), (2, A), (3, B)])  # gold are [DOC 2] and [DOC 3]
CITE = "Relevant documents: [DOC 2], [DOC 3]\n"
COPY_A = f"[DOC 2] Ada Lark\n{A.text}\n\n"
COPY_B = f"[DOC 3] Oslo\n{B.text}\n\n"
QUOTE_A = '[DOC 2] "Ada Lark was born in Oslo."\n'
QUOTE_B = '[DOC 3] "Oslo is by the sea."\n'
ANSWER = "The answer is: Oslo"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("", 0.0),
        (ANSWER, 1.0),
        ("Oslo", 0.0),  # format violation: no marker
        ("The answer is: Rome", 0.0),
        ("I checked.\nthe answer is oslo, Norway", 1.0),  # SubEM, marker without colon
        ("The answer is:", 0.0),
        ("The answer is: Oslo. Wait, the answer is: Rome", 0.0),  # the last marker counts
    ],
)
def test_ao(completion: str, expected: float) -> None:
    assert REWARDS["ao"](completion, INST, PROMPT) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (CITE + ANSWER, 1.0),
        ("[DOC 2]\n" + ANSWER, 0.5 * 2 / 3 + 0.5),  # precision 1, recall 1/2: F1 2/3
        ("[DOC 1] [DOC 2] [DOC 3]\nThe answer is: Rome", 0.5 * 0.8),  # P 2/3, R 1: F1 0.8
        ("[DOC 1]\n" + ANSWER, 0.5),  # cites only a distractor
        (ANSWER, 0.0),  # format violation: no citation
        (ANSWER + " [DOC 2]", 0.0),  # cited after the answer
        ("[DOC 9]\n" + ANSWER, 0.0),  # no such doc in the prompt
        (CITE, 0.0),  # no answer marker
        ("", 0.0),
    ],
)
def test_id(completion: str, expected: float) -> None:
    assert REWARDS["id"](completion, INST, PROMPT) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (CITE + "Copied documents:\n" + COPY_A + COPY_B + ANSWER, 1.0),
        (CITE + COPY_A + ANSWER, (1 + 0.5 + 1) / 3),  # one of two cited docs copied
        (CITE + COPY_A.replace(". ", ".\n") + COPY_B.replace(" ", "  ") + ANSWER, 1.0),
        (CITE + ANSWER, (1 + 0 + 1) / 3),  # no copies
        (CITE + A.text[:-5] + "\n" + COPY_B + ANSWER, (1 + 0.5 + 1) / 3),  # truncated copy
        (CITE + COPY_A + COPY_B + "The answer is: Rome", (1 + 1 + 0) / 3),
        ("[DOC 1]\n" + C.text + "\n" + ANSWER, (0 + 1 + 1) / 3),  # copied a distractor
        (CITE + COPY_A + COPY_B, 0.0),  # no answer marker
        ("", 0.0),
    ],
)
def test_id_copy(completion: str, expected: float) -> None:
    assert REWARDS["id+c"](completion, INST, PROMPT) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (CITE + "Quotes:\n" + QUOTE_A + QUOTE_B + ANSWER, 1.0),
        (CITE + QUOTE_A.replace("Oslo", "Bergen") + QUOTE_B + ANSWER, (1 + 0.5 + 1) / 3),
        (CITE + '[DOC 3] "Ada Lark was born in Oslo."\n' + ANSWER, (1 + 0 + 1) / 3),  # wrong doc
        (CITE + f'[DOC 3] "{" ".join(["fjord"] * 30)}"\n' + ANSWER, 1.0),  # 30 tokens: allowed
        (CITE + f'[DOC 3] "{FJORDS}"\n' + ANSWER, (1 + 0 + 1) / 3),  # 35 tokens: too long
        (CITE + '[DOC 2] ""\n' + ANSWER, (1 + 0 + 1) / 3),  # empty quote
        (CITE + '[DOC 2] "Ada  Lark was\tborn in Oslo."\n' + ANSWER, 1.0),  # spacing ignored
        (CITE + ANSWER, (1 + 0 + 1) / 3),  # no quotes
        ('[DOC 2] "Ada Lark was born in Oslo."\n' + ANSWER, (2 / 3 + 1 + 1) / 3),
        (CITE + QUOTE_A + QUOTE_B, 0.0),  # no answer marker
        ("", 0.0),
    ],
)
def test_id_quotes(completion: str, expected: float) -> None:
    assert REWARDS["id+q"](completion, INST, PROMPT) == pytest.approx(expected)


def test_id_quotes_counts_tokens_with_the_given_counter() -> None:
    completion = CITE + f'[DOC 3] "{" ".join(["fjord"] * 20)}"\n' + ANSWER
    assert get_reward("id+q")(completion, INST, PROMPT) == pytest.approx(1.0)
    doubled = get_reward("id+q", count_tokens=lambda t: 2 * len(t.split()))
    assert doubled(completion, INST, PROMPT) == pytest.approx(2 / 3)  # 40 tokens


@pytest.mark.parametrize(
    ("completion", "judged", "expected", "evidence"),
    [
        ("Ada was born in Oslo, says [DOC 2].\n" + ANSWER, 0.8, 0.9, [COPY_A.strip()]),
        ("[DOC 3] and [DOC 1] and [DOC 3].\nThe answer is: Rome", 0.6, 0.3,
         [COPY_B.strip(), f"[DOC 1] Bo Finch\n{C.text}"]),
        ("Reasoning [DOC 9].\n" + ANSWER, 0.0, 0.5, []),  # no such document
        ("Reasoning.\n" + ANSWER, None, 0.5, []),  # a reply without a rating counts 0
    ],
)
def test_judge_sees_question_gold_and_cited_documents(completion, judged, expected, evidence):
    cases = []

    def score_fn(case):
        cases.append(case)
        return judged

    assert judge_reward(score_fn)(completion, INST, PROMPT) == pytest.approx(expected)
    [case] = cases
    assert (case.question, case.golds, case.output) == (INST.question, ["Oslo"], completion)
    assert case.evidence == evidence


def test_judge_is_not_called_on_a_format_violation() -> None:
    def score_fn(case) -> float:
        raise AssertionError("judge called")

    assert get_reward("judge", judge=score_fn)("Oslo", INST, PROMPT) == 0.0


def test_judge_score_outside_unit_interval_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"instance 'q1' 7.*scale the judge's score"):
        judge_reward(lambda case: 7)(ANSWER, INST, PROMPT)


FROG = Doc("f", "The frog", "The frog eats kelp.")
MC = Instance(id="q2", question="What does the frog eat?", answers=["B"], docs=[C, FROG],
              gold_doc_ids=["f"], task="mc", choices=["moss", "kelp", "figs"])
MC_PROMPT = build_prompt(MC)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [("The answer is: B", 1.0), ("The answer is: (C)", 0.0), ("The answer is: kelp", 1.0),
     ("B", 0.0)],
)
def test_multiple_choice_answers_are_read_as_evaluation_reads_them(
    completion: str, expected: float
) -> None:
    assert REWARDS["ao"](completion, MC, MC_PROMPT) == expected


@pytest.mark.parametrize("name", ["id", "id+c", "id+q"])
def test_citing_rewards_need_gold_ids(name: str) -> None:
    no_gold = Instance(id="helmet-3", question="Q?", answers=["Oslo"], docs=[A],
                       gold_doc_ids=[])
    prompt = build_prompt(no_gold)
    message = f"instance 'helmet-3' has no gold_doc_ids, but reward '{name}' cites"
    with pytest.raises(FormatError, match=re.escape(message)):
        REWARDS[name]("[DOC 1]\n" + ANSWER, no_gold, prompt)
    assert REWARDS["ao"](ANSWER, no_gold, prompt) == 1.0


GARBAGE = ["", " ", "[DOC", "The answer is", "[DOC 0] [DOC -1]\nthe answer is: ???",
           "\n\n".join([CITE, COPY_A, COPY_A, QUOTE_A * 3, ANSWER * 2])]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_rewards_stay_in_unit_interval(name: str) -> None:
    for completion in GARBAGE:
        assert 0.0 <= REWARDS[name](completion, INST, PROMPT) <= 1.0, completion


@pytest.mark.parametrize(
    ("fmt", "reward"), [("answer", "ao"), ("ids", "id"), ("ids+copy", "id+c"),
                        ("ids+quotes", "id+q")],
)
def test_each_format_earns_full_reward(fmt: str, reward: str) -> None:
    for ex in build_examples(read_jsonl(DEMO_PATH)[:12], fmt, 0, count_words):
        assert REWARDS[reward](ex.target, ex.instance, ex.prompt) == 1.0, ex.id


def test_unknown_reward_and_judge_without_a_judge_are_errors() -> None:
    with pytest.raises(ValueError, match=r"'r1'.*\['ao', 'id', 'id\+c', 'id\+q', 'judge'\]"):
        get_reward("r1")
    with pytest.raises(ValueError, match="reward 'judge' needs a judge"):
        get_reward("judge")
