"""kvrag: long-context LM vs compressed KV cache vs RAG, side by side on identical questions."""

__version__ = "0.1.0"
