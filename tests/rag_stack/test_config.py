from kvrag.rag_stack.config import RETRIEVER_NAMES
from kvrag.rag_stack.retrievers import RETRIEVERS


def test_the_light_retriever_names_are_the_registry():
    assert tuple(RETRIEVERS) == RETRIEVER_NAMES
