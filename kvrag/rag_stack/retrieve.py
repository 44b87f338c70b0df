"""Fill a token budget with a question's best chunks, asking the store only for the top few.

The ranking is read in pages: the first asks for ``k0 = 2 * ceil(budget / chunk_tokens) +
8`` chunks (twice what fills the budget at full chunk size, plus a margin for short
chunks), and the next, twice as many, only while the budget is not filled. Chunks are
taken in rank order by their stored block counts; one that would overflow is skipped.

Stop rule: the scan ends when the remaining budget is below the smallest block the
collection holds (nothing more can fit), or once ``k0`` chunks have been skipped (a
low-ranked short chunk is not worth reading the whole ranking for), or when the ranking
runs out. The joined context is then counted exactly once, since tokens can merge across
block boundaries, and the lowest-ranked chunks are dropped until it fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvrag.rag_stack.chunk import Chunk
from kvrag.rag_stack.config import ORDERS

if TYPE_CHECKING:
    from kvrag.rag_stack.retrievers import Ranker



def first_page(budget: int, chunk_tokens: int) -> int:
    return 2 * math.ceil(budget / chunk_tokens) + 8


def retrieve(
    ranker: Ranker, question: str, budget: int, count_tokens: Callable[[str], int],
    order: str = "score", chunk_tokens: int = 128, min_block: int = 1,
) -> list[Chunk]:
    """The best chunks whose prompt blocks, joined, fit in ``budget`` tokens;
    ``order="document"`` then puts them back in corpus order (doc number, position)."""
    if order not in ORDERS:
        raise ValueError(f"unknown retrieval order {order!r}; use one of {ORDERS}")
    if budget <= 0:
        return []
    k0 = first_page(budget, chunk_tokens)
    chosen: list[Chunk] = []
    seen: set[tuple[str, int]] = set()
    used = skipped = 0
    k = k0
    while True:
        ranking = ranker.top(question, k)
        for chunk in ranking:
            if chunk.key in seen:
                continue
            seen.add(chunk.key)
            if used + chunk.block_tokens <= budget:
                chosen.append(chunk)
                used += chunk.block_tokens
            else:
                skipped += 1
            if budget - used < min_block or skipped >= k0:
                break
        else:
            if len(ranking) == k:
                k *= 2
                continue
        break
    while chosen and count_tokens("".join(c.block() for c in chosen)) > budget:
        chosen.pop()
    if order == "document":
        chosen.sort(key=lambda c: (c.doc_number, c.position))
    return chosen
