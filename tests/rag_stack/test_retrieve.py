import uuid

import pytest

from kvrag.data.schema import Doc
from kvrag.rag_stack.chroma import ChromaUnavailableError, open_client
from kvrag.rag_stack.ingest import chunk_docs, ingest
from kvrag.rag_stack.retrieve import retrieve

FILLER = ["The river festival draws visitors every spring.",
          "Old maps show a road that no longer exists.",
          "The library keeps records of local weather.",
          "A bakery on the square sells rye bread.",
          "The council meets on the first Monday."]
DOCS = [Doc(f"d{i}", f"Town {i}", " ".join(FILLER[(i + j) % 5] for j in range(6)))
        for i in range(8)]
DOCS.insert(5, Doc("gold", "Mirela Voss", "Mirela Voss keeps a tortoise named Captain Pike."))


@pytest.fixture()
def collection(client, embed, tokenize):
    coll = client.get_or_create_collection(f"test-{uuid.uuid4().hex}")
    ingest(coll, chunk_docs(DOCS, 32, tokenize), embed)
    return coll


def test_finds_the_planted_fact(collection, embed, tokenize) -> None:
    chunks = retrieve(collection, embed, "What is the name of Mirela Voss's tortoise?", 60,
                      lambda t: len(tokenize(t)))
    assert chunks[0].doc_id == "gold" and chunks[0].doc_number == 6
    assert "Captain Pike" in chunks[0].text


@pytest.mark.parametrize("budget", [1, 40, 100, 333])
def test_budget_respected_to_the_token(collection, embed, tokenize, budget) -> None:
    count = lambda t: len(tokenize(t))  # noqa: E731
    chunks = retrieve(collection, embed, "river festival", budget, count)
    context = "".join(c.block() for c in chunks)
    assert count(context) <= budget
    everything = retrieve(collection, embed, "river festival", 10_000, count)
    left_out = [c for c in everything if c not in chunks]
    assert all(count(context + c.block()) > budget for c in left_out)  # nothing else fits


def test_document_order(collection, embed, tokenize) -> None:
    chunks = retrieve(collection, embed, "tortoise", 200, lambda t: len(tokenize(t)),
                      order="document")
    keys = [(c.doc_number, c.position) for c in chunks]
    assert keys == sorted(keys) and len(keys) > 2


def test_unreachable_server_names_the_url() -> None:
    with pytest.raises(ChromaUnavailableError, match="http://127.0.0.1:9 "):
        open_client(url="http://127.0.0.1:9")
