"""The bundled demo suite: four task families over fictional facts.

Every fact is invented from seeded random parts (names, towns, firms, figures), so a
model cannot answer from pre-training; it has to find the gold document(s), which are
shuffled among distractors of the same shape. ``make_demo(seed, context_tokens)`` is
deterministic; the frozen copy shipped in ``kvrag/data/demo/demo.jsonl`` is
``make_demo(seed=0, context_tokens=2300, per_task=50)``; the shared-corpus suite
(``kvrag/data/demo/demo_shared.jsonl``, ``--dataset demo-shared``) is 10 corpora of 8
questions, ``make_demo(seed=0, context_tokens=2300, per_task=20, questions_per_corpus=8)``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

from kvrag.data.schema import LETTERS, Doc, Instance

DEMO_PATH = Path(__file__).parent / "demo" / "demo.jsonl"
DEMO_SHARED_PATH = Path(__file__).parent / "demo" / "demo_shared.jsonl"
DEMO_SHARED = {"per_task": 20, "questions_per_corpus": 8}
DEMO_SEED = 0
DEMO_CONTEXT_TOKENS = 2300
DEMO_PER_TASK = 50
SUBSETS = ("single_hop", "two_hop", "multiple_choice", "finance")

# A model-free token estimate, so generation is reproducible anywhere: SmolLM2's tokenizer
# spends about one token per 4.4 characters of this prose but one per digit or table pipe
# (checked against the real tokenizer in tests/data/test_demo.py).
CHARS_PER_TOKEN = 4.4
_ONE_TOKEN_EACH = re.compile(r"[\d|]")

_ONSETS = ["Br", "Cal", "Dor", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lor", "Mar",
           "Nor", "Or", "Pel", "Quin", "Ros", "Sel", "Tor", "Ul", "Vel", "Wen", "Yr", "Zan"]
_MIDDLES = ["a", "e", "i", "o", "u", "ae", "ia", "io", "y"]
_CODAS = ["bric", "dell", "fane", "garth", "lin", "mire", "nost", "quist", "rath", "ster",
          "thorne", "vell", "wick", "zel", "rin", "mond"]
_TOWN_A = ["Ash", "Bram", "Cinder", "Dusk", "Ember", "Frost", "Gull", "Heron", "Iron", "Juniper",
           "Kestrel", "Lark", "Moss", "Nettle", "Oak", "Pike", "Quarry", "Raven", "Salt",
           "Thistle", "Umber", "Vane", "Willow", "Yarrow"]
_TOWN_B = ["ford", "mere", "haven", "moor", "wick", "stead", "hollow", "reach", "bury", "combe",
           "field", "gate", "holm", "ridge", "wold", "crest"]
_PROFESSIONS = ["glassblower", "cartographer", "beekeeper", "clockmaker", "astronomer",
                "bookbinder", "ferry pilot", "botanist", "stonemason", "violin maker",
                "lighthouse keeper", "perfumer", "tea merchant", "geologist", "weaver",
                "puppeteer", "archivist", "shipwright"]
_INSTRUMENTS = ["cello", "oboe", "harp", "accordion", "zither", "bassoon", "lute", "marimba",
                "banjo", "flute", "dulcimer", "trombone"]
_COLOURS = ["amber", "cobalt", "crimson", "ivory", "jade", "ochre", "saffron", "slate",
            "teal", "umber", "violet", "scarlet"]
_PRODUCTS = ["rope bridges", "weather balloons", "copper kettles", "sail cloth", "tide clocks",
             "lantern glass", "felt hats", "ceramic tiles", "seed drills", "music boxes",
             "snow sledges", "canal locks", "paper kites", "iron stoves"]
_CREATURES = ["beetle", "moth", "lizard", "finch", "frog", "salamander", "heron", "vole",
              "snail", "bat", "newt", "crab"]
_FOODS = ["lichen", "pine resin", "river snails", "clover seeds", "fallen figs", "moss spores",
          "mayflies", "acorn flour", "kelp", "thistle nectar", "ant larvae", "wild garlic"]
_HABITATS = ["salt marshes", "limestone caves", "birch forests", "volcanic slopes",
             "tidal pools", "high meadows", "peat bogs", "river gorges", "sand dunes",
             "cloud forests"]
_FILLER = [
    "Local records describe the period as unusually busy.",
    "Several letters from that time survive in a private collection.",
    "A short documentary about this was filmed decades later.",
    "The details were confirmed by a regional historical society.",
    "Visitors still ask about it at the town library.",
    "Accounts from neighbours agree on most of the particulars.",
    "A commemorative plaque mentions the event briefly.",
    "The story is often retold at the annual harvest fair.",
]


class _Names:
    """Draws invented names without repeating one within an instance."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _unique(self, make: Callable[[], str], wider: Callable[[], str] | None = None) -> str:
        """A fresh name from ``make``; once ``make`` keeps repeating (a long context has
        used up its small space), from ``wider``."""
        for tries in range(1_000_000):
            name = make() if tries < 50 or wider is None else wider()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("no unused invented name left")

    def word(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_MIDDLES) + r.choice(_CODAS)

    def person(self) -> str:
        return self._unique(lambda: f"{self.word()} {self.word()}",
                            lambda: f"{self.word()} {self.word()}-{self.word()}")

    def town(self) -> str:
        return self._unique(lambda: self.rng.choice(_TOWN_A) + self.rng.choice(_TOWN_B),
                            lambda: self.word() + self.rng.choice(_TOWN_B))

    def firm(self) -> str:
        suffix = ["Works", "Company", "Holdings", "Guild", "Brothers", "Industries"]
        return self._unique(lambda: f"{self.word()} {self.rng.choice(suffix)}",
                            lambda: f"{self.word()} {self.word()} {self.rng.choice(suffix)}")

    def creature(self) -> str:
        return self._unique(lambda: f"{self.word().lower()} {self.rng.choice(_CREATURES)}",
                            lambda: f"{self.word().lower()}-{self.word().lower()} "
                                    f"{self.rng.choice(_CREATURES)}")


def _filler(rng: random.Random, n: int) -> str:
    return " ".join(rng.sample(_FILLER, n))


def _profile(rng: random.Random, names: _Names) -> tuple[str, str, dict[str, str]]:
    """A fictional person's profile: (title, text, facts)."""
    name = names.person()
    facts = {
        "name": name, "town": names.town(), "profession": rng.choice(_PROFESSIONS),
        "year": str(rng.randint(1820, 1990)), "instrument": rng.choice(_INSTRUMENTS),
        "colour": rng.choice(_COLOURS),
    }
    text = (
        f"{name} was a {facts['profession']} born in {facts['town']} in {facts['year']}. "
        f"As a child, {name.split()[0]} learned to play the {facts['instrument']}. "
        f"{_filler(rng, 2)} Friends remembered that {name.split()[0]} painted every door "
        f"of the family house {facts['colour']}. {_filler(rng, 1)}"
    )
    return name, text, facts


def estimate_tokens(text: str) -> float:
    single = len(_ONE_TOKEN_EACH.findall(text))
    return single + (len(text) - single) / CHARS_PER_TOKEN


def _fill(
    rng: random.Random, gold: list[Doc], make_distractor: Callable[[], Doc],
    context_tokens: int,
) -> tuple[list[Doc], list[str]]:
    """Add distractors until the context reaches ``context_tokens``, then shuffle."""
    docs = list(gold)
    size = sum(estimate_tokens(f"[DOC 00] {d.title}\n{d.text}\n\n") for d in docs)
    while size < context_tokens:
        d = make_distractor()
        docs.append(d)
        size += estimate_tokens(f"[DOC 00] {d.title}\n{d.text}\n\n")
    rng.shuffle(docs)
    return docs, [d.id for d in gold]


def _single_hop(
    rng: random.Random, context_tokens: int, names: _Names | None = None
) -> tuple[Instance, str]:
    names = names or _Names(rng)
    counter = iter(range(10_000))

    def doc() -> tuple[Doc, dict[str, str]]:
        title, text, facts = _profile(rng, names)
        return Doc(id=f"p{next(counter)}", title=title, text=text), facts

    gold, facts = doc()
    attr, question = rng.choice([
        ("town", f"In which town was {facts['name']} born?"),
        ("profession", f"What was the profession of {facts['name']}?"),
        ("instrument", f"Which instrument did {facts['name']} learn to play as a child?"),
        ("year", f"In which year was {facts['name']} born?"),
    ])
    docs, gold_ids = _fill(rng, [gold], lambda: doc()[0], context_tokens)
    return Instance(id="", question=question, answers=[facts[attr]], docs=docs,
                    gold_doc_ids=gold_ids, task="qa"), "single_hop"


def _two_hop(
    rng: random.Random, context_tokens: int, names: _Names | None = None
) -> tuple[Instance, str]:
    names = names or _Names(rng)
    counter = iter(range(10_000))

    def pair() -> tuple[Doc, Doc, dict[str, str]]:
        founder, firm, city = names.person(), names.firm(), names.town()
        product, year = rng.choice(_PRODUCTS), str(rng.randint(1850, 1995))
        person = Doc(
            id=f"d{next(counter)}", title=founder,
            text=(f"{founder} is remembered as a restless inventor. In {year}, "
                  f"{founder.split()[0]} founded {firm}. {_filler(rng, 2)}"),
        )
        company = Doc(
            id=f"d{next(counter)}", title=firm,
            text=(f"{firm} makes {product}. The firm has its headquarters in {city}, where "
                  f"most of its workshops are. {_filler(rng, 2)}"),
        )
        return person, company, {"founder": founder, "city": city, "product": product}

    person, company, facts = pair()
    question, answer = rng.choice([
        (f"In which town is the company founded by {facts['founder']} headquartered?",
         facts["city"]),
        (f"What does the company founded by {facts['founder']} make?", facts["product"]),
    ])
    # Distractors come in pairs too, so every company has a founder elsewhere in the corpus.
    spare: list[Doc] = []

    def distractor() -> Doc:
        if not spare:
            p, c, _ = pair()
            spare.extend([p, c])
        return spare.pop()

    docs, gold_ids = _fill(rng, [person, company], distractor, context_tokens)
    return Instance(id="", question=question, answers=[answer], docs=docs,
                    gold_doc_ids=gold_ids, task="qa"), "two_hop"


def _multiple_choice(
    rng: random.Random, context_tokens: int, names: _Names | None = None
) -> tuple[Instance, str]:
    names = names or _Names(rng)
    counter = iter(range(10_000))

    def doc() -> tuple[Doc, dict[str, str]]:
        name = names.creature()
        facts = {"name": name, "food": rng.choice(_FOODS), "habitat": rng.choice(_HABITATS)}
        text = (f"The {name} is found only in the {facts['habitat']} of "
                f"{names.town()}. It feeds almost entirely on {facts['food']}. "
                f"{_filler(rng, 2)}")
        return Doc(id=f"s{next(counter)}", title=f"The {name}", text=text), facts

    gold, facts = doc()
    attr, pool, question = rng.choice([
        ("food", _FOODS, f"What does the {facts['name']} feed on?"),
        ("habitat", _HABITATS, f"Where is the {facts['name']} found?"),
    ])
    choices = rng.sample([x for x in pool if x != facts[attr]], 3) + [facts[attr]]
    rng.shuffle(choices)
    docs, gold_ids = _fill(rng, [gold], lambda: doc()[0], context_tokens)
    letter = LETTERS[choices.index(facts[attr])]
    return Instance(id="", question=question, answers=[letter], docs=docs,
                    gold_doc_ids=gold_ids, task="mc", choices=choices), "multiple_choice"


def _finance(
    rng: random.Random, context_tokens: int, names: _Names | None = None
) -> tuple[Instance, str]:
    names = names or _Names(rng)
    counter = iter(range(10_000))

    def doc() -> tuple[Doc, dict[str, object]]:
        firm = names.firm()
        revenue = [rng.randint(120, 900) for _ in range(4)]
        costs = [r - rng.randint(10, r // 2) for r in revenue]
        rows = "\n".join(f"| Q{q + 1} | {revenue[q]} | {costs[q]} |" for q in range(4))
        text = (f"Quarterly results of {firm} for the last fiscal year, in millions of "
                f"dollars.\n| Quarter | Revenue | Operating costs |\n|---|---|---|\n{rows}\n"
                f"{_filler(rng, 1)}")
        return (Doc(id=f"f{next(counter)}", title=f"{firm} annual report", text=text),
                {"firm": firm, "revenue": revenue, "costs": costs})

    gold, facts = doc()
    firm, revenue, costs = facts["firm"], facts["revenue"], facts["costs"]
    assert isinstance(revenue, list) and isinstance(costs, list)
    q = rng.randrange(4)
    kind = rng.choice(["lookup", "sum", "profit"])
    if kind == "lookup":
        question, answer = f"What was the revenue of {firm} in Q{q + 1}?", revenue[q]
    elif kind == "sum":
        q = min(q, 2)
        question = f"What was the total revenue of {firm} in Q{q + 1} and Q{q + 2} combined?"
        answer = revenue[q] + revenue[q + 1]
    else:
        question = (f"What was the operating profit (revenue minus operating costs) of "
                    f"{firm} in Q{q + 1}?")
        answer = revenue[q] - costs[q]
    question += " Give the number in millions of dollars."
    docs, gold_ids = _fill(rng, [gold], lambda: doc()[0], context_tokens)
    return Instance(id="", question=question, answers=[str(answer)], docs=docs,
                    gold_doc_ids=gold_ids, task="qa"), "finance"


_GENERATORS: dict[str, Callable[[random.Random, int, _Names | None], tuple[Instance, str]]] = {
    "single_hop": _single_hop, "two_hop": _two_hop,
    "multiple_choice": _multiple_choice, "finance": _finance,
}


def make_demo(
    seed: int = DEMO_SEED, context_tokens: int = DEMO_CONTEXT_TOKENS,
    per_task: int = DEMO_PER_TASK, questions_per_corpus: int = 1,
) -> list[Instance]:
    """Generate the suite, tasks interleaved so any prefix (``--limit``) mixes all four.

    ``questions_per_corpus`` K > 1 asks K questions over each corpus of about
    ``context_tokens``: the corpus is the union of the K questions' documents (each
    question's gold documents and distractors, about ``context_tokens / K`` each, with no
    invented name used twice), shuffled, and the K questions cycle through the families.
    """
    if context_tokens < 200:
        raise ValueError(f"context_tokens must be at least 200, got {context_tokens}")
    if per_task < 1:
        raise ValueError(f"per_task must be at least 1, got {per_task}")
    total = per_task * len(SUBSETS)
    if questions_per_corpus < 1 or total % questions_per_corpus:
        raise ValueError(f"questions_per_corpus must be at least 1 and divide the "
                         f"{total} questions (per_task x {len(SUBSETS)} families), got "
                         f"{questions_per_corpus}")
    rng = random.Random(seed)
    if questions_per_corpus > 1:
        return [inst for c in range(total // questions_per_corpus)
                for inst in _shared_corpus(rng, seed, c, context_tokens, questions_per_corpus)]
    out = []
    for k in range(per_task):
        for subset in SUBSETS:
            inst, _ = _GENERATORS[subset](rng, context_tokens, None)
            out.append(_named(inst, f"{subset}-{seed}-{k:03d}", subset))
    return out


def _named(inst: Instance, id: str, subset: str, docs: list[Doc] | None = None,
           gold: list[str] | None = None) -> Instance:
    return Instance(id=id, question=inst.question, answers=inst.answers,
                    docs=inst.docs if docs is None else docs,
                    gold_doc_ids=inst.gold_doc_ids if gold is None else gold,
                    task=inst.task, choices=inst.choices, subset=subset)


def _shared_corpus(rng: random.Random, seed: int, corpus: int, context_tokens: int,
                   k: int) -> list[Instance]:
    """``k`` questions over one corpus: the union of their documents, shuffled."""
    names = _Names(rng)
    parts = []
    for q in range(k):
        subset = SUBSETS[(corpus * k + q) % len(SUBSETS)]
        inst, _ = _GENERATORS[subset](rng, max(1, context_tokens // k), names)
        parts.append((q, subset, inst))
    docs = [Doc(f"q{q}-{d.id}", d.title, d.text) for q, _, inst in parts for d in inst.docs]
    rng.shuffle(docs)
    return [_named(inst, f"{subset}-shared{seed}-c{corpus:02d}-q{q}", subset, docs,
                   [f"q{q}-{g}" for g in inst.gold_doc_ids])
            for q, subset, inst in parts]
