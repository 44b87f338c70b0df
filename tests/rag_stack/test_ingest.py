import uuid

from kvrag.data.schema import Doc
from kvrag.rag_stack.ingest import chunk_docs, ingest

DOCS = [
    Doc("alpha", "Alpha", " ".join(f"Alpha sentence number {i} talks about lighthouses."
                                   for i in range(40))),
    Doc("beta", "Beta", "Beta is short. It mentions the violet harbour crane."),
]


def new_collection(client):
    return client.get_or_create_collection(f"test-{uuid.uuid4().hex}")


def test_chunks_keep_doc_ids_and_size(tokenize) -> None:
    nodes = chunk_docs(DOCS, 64, tokenize)
    assert {n.metadata["source_id"] for n in nodes} == {"alpha", "beta"}
    alpha = [n for n in nodes if n.metadata["source_id"] == "alpha"]
    assert len(alpha) > 3 and all(n.metadata["doc_number"] == 1 for n in alpha)
    assert [n.metadata["position"] for n in alpha] == list(range(len(alpha)))
    assert all(len(tokenize(n.text)) <= 64 for n in nodes)
    assert chunk_docs(DOCS, 64, tokenize)[0].node_id == nodes[0].node_id  # content ids


def test_reingest_adds_nothing(client, embed, tokenize) -> None:
    collection = new_collection(client)
    nodes = chunk_docs(DOCS, 64, tokenize)
    first = ingest(collection, nodes, embed)
    assert first.added == len(nodes) == collection.count()
    again = ingest(collection, chunk_docs(DOCS, 64, tokenize), embed)
    assert (again.added, again.removed, again.unchanged) == (0, 0, len(nodes))
    assert collection.count() == len(nodes)


def test_changed_doc_replaces_its_chunks(client, embed, tokenize) -> None:
    collection = new_collection(client)
    ingest(collection, chunk_docs(DOCS, 64, tokenize), embed)
    changed = [DOCS[0], Doc("beta", "Beta", "Beta now describes a copper bell tower.")]
    stats = ingest(collection, chunk_docs(changed, 64, tokenize), embed)
    assert stats.added == 1 and stats.removed == 1
    beta = collection.get(where={"source_id": "beta"}, include=["documents"])
    assert beta["documents"] == ["Beta now describes a copper bell tower."]
