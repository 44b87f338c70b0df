"""One ``generate`` interface over HF transformers (and, later, SGLang)."""

from kvrag.engines.base import Cost, Engine, Generation

__all__ = ["Cost", "Engine", "Generation"]
