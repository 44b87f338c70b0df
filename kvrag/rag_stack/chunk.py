"""A retrieved chunk, as the prompt shows it and as the record cites it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrag.data.prompt import format_doc
from kvrag.data.schema import Doc

if TYPE_CHECKING:
    from llama_index.core.schema import BaseNode


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    doc_number: int
    title: str
    position: int
    text: str
    score: float
    block_tokens: int  # tokens of block(), counted alone at ingest

    @classmethod
    def of(cls, node: BaseNode, score: float) -> Chunk:
        meta = node.metadata
        return cls(doc_id=meta["source_id"], doc_number=int(meta["doc_number"]),
                   title=meta["title"], position=int(meta["position"]),
                   text=node.get_content(), score=score,
                   block_tokens=int(meta["block_tokens"]))

    @property
    def key(self) -> tuple[str, int]:
        return self.doc_id, self.position

    def as_doc(self) -> Doc:
        return Doc(id=self.doc_id, title=self.title, text=self.text)

    def block(self) -> str:
        """The chunk as it appears in the prompt."""
        return format_doc(self.doc_number, self.as_doc())
