"""One generate interface over HF transformers, the SGLang engine in process, and a running
SGLang server by URL."""

from kvrag.engines.base import Cost, Engine, Generation

__all__ = ["Cost", "Engine", "Generation"]
