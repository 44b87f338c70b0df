"""kvrag's optional parts and the packages each needs.

The core (compare on the HF engine, compression, report, analyze, data, SFT) imports none
of these. A module of an optional part is imported only inside the function that needs
it, after ``require`` has checked the part is installed, so a core install says what to
install instead of failing with a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib

EXTRAS: dict[str, tuple[str, ...]] = {
    "sglang": ("sglang",),
    "router": ("sglang_router",),
    "rag": ("llama_index.core", "llama_index.vector_stores.chroma", "chromadb"),
    "train": ("trl",),
}
# the pip extra that brings each part: the router comes with SGLang
PIP_EXTRA = {"sglang": "sglang", "router": "sglang", "rag": "rag", "train": "train"}


class MissingExtraError(ImportError):
    """An optional part of kvrag that a command needs is not installed."""

    def __init__(self, part: str, feature: str, missing: str) -> None:
        self.part = part
        super().__init__(
            f"{feature} needs kvrag's '{PIP_EXTRA[part]}' extra ({missing} cannot be "
            f"imported): pip install 'kvrag[{PIP_EXTRA[part]}]'")


def require(part: str, feature: str) -> None:
    """Import ``part``'s packages, or raise ``MissingExtraError`` naming ``feature``."""
    for module in EXTRAS[part]:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise MissingExtraError(part, feature, module) from e


def available(part: str) -> bool:
    try:
        require(part, part)
    except MissingExtraError:
        return False
    return True
