"""Seeing what a run's rag systems retrieved, question by question."""

from __future__ import annotations

import pytest

from kvrag.data.schema import Instance
from kvrag.rag_stack.pipeline import RagContext, RagPipeline


def spy_retrieval(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Instance, RagContext]]:
    """Every (question as the system got it, what RAG retrieved for it) from now on."""
    seen: list[tuple[Instance, RagContext]] = []
    real = RagPipeline.context

    def context(self, instance, *args, **kwargs):
        ctx = real(self, instance, *args, **kwargs)
        seen.append((instance, ctx))
        return ctx

    monkeypatch.setattr(RagPipeline, "context", context)
    return seen
