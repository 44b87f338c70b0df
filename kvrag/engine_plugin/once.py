"""Compress once, answer many: a compressed corpus prefix kept in SGLang's radix tree.

A request with a ``once:`` spec names its corpus prefix (``[0, end)``, where its
``kvrag_span`` ends). The prefix's compressed cache, ``kmax`` slots (the kept tokens of
every layer and KV head, laid out as ``compaction.py`` describes), is stored as an
ordinary radix-tree entry under a key of its own: ``kmax`` synthetic token ids derived
from a hash of the prefix ids and the spec, in a tree namespace (``extra_key``) that no
plain request uses. So the tree owns, locks and evicts it like any other prefix, with
its real size (the kept slots), and SGLang's memory checks count it.

- **Hit.** Before the request is matched against the tree, its prompt is rewritten to
  the key followed by its question tokens. When the tree holds the whole key, the
  request prefills only its question, over the kept slots, and its positions are shifted
  by ``end - kmax`` (the attention backend adds the shift before the model runs), so RoPE
  sees the logical positions. Nothing else about it differs from a plain request.
- **Miss.** The prompt is put back. The request prefills its prefix alone (its chunk is
  cut at ``end``), is compacted there with the prefix's last queries (question-agnostic
  scoring), and then extends its question over the compacted cache. When it leaves, its
  kept slots go to the tree under the key instead of back to the allocator.

A ``full`` request over the same corpus matches the real prefix in the tree as before.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from kvrag.compression import CompressionSpec

NAMESPACE = "kvrag-once"
_HASH_TOKENS = 4  # 124 hash bits lead the key; 31 each keeps ids in int32


def kept_prefix(spec: CompressionSpec, span: tuple[int, int]) -> int:
    """Slots a compressed prefix ``[0, span[1])`` holds: everything before the span and the
    document tokens the spec keeps (one count for all layers: ``config.check_servable``)."""
    start, end = span
    return start + spec.kept(end - start)


def key_tokens(prefix: array | list[int], spec: CompressionSpec, kmax: int) -> array:
    """The tree key of a compressed prefix: a hash of its ids and spec, the prefix's
    length (what recomputing it costs, which ``kvrag-cost`` reads), then a count."""
    digest = hashlib.sha256(array("q", prefix).tobytes() + spec.name.encode()).digest()
    head = [int.from_bytes(digest[4 * i:4 * i + 4], "little") & 0x7FFFFFFF
            for i in range(_HASH_TOKENS)]
    return array("q", (head + [len(prefix)] + list(range(kmax)))[:kmax])


def stored_prefix_length(key) -> int | None:
    """The logical length of the compressed prefix a tree node's ``RadixKey`` stores, or
    None for an ordinary node (its ``extra_key`` is not a compress-once namespace)."""
    extra = getattr(key, "extra_key", None)
    if not (isinstance(extra, str) and extra.startswith(NAMESPACE + ":")) \
            or len(key) <= _HASH_TOKENS:
        return None
    return int(key.token_ids[_HASH_TOKENS])


def namespace(spec: CompressionSpec, extra_key: str | None) -> str:
    return f"{NAMESPACE}:{spec.name}:{extra_key or ''}"


@dataclass
class OnceRequest:
    """One ``once:`` request's two prompts and which it runs with."""

    spec: CompressionSpec
    end: int  # the corpus prefix is [0, end)
    kmax: int
    real: array  # the prompt as sent
    key: array  # the compressed prefix's tree key
    extra_key: str | None  # the request's own tree namespace
    cache_salt: str | None
    state: str = "new"  # "hit": over the stored prefix; "miss": builds it

    @classmethod
    def of(cls, spec: CompressionSpec, span: tuple[int, int], prompt, extra_key, cache_salt):
        kmax = kept_prefix(spec, span)
        real = array("q", prompt)
        return cls(spec, span[1], kmax, real, key_tokens(real[:span[1]], spec, kmax),
                   extra_key, cache_salt)

    @property
    def shift(self) -> int:
        """Logical minus physical position of a hit's tokens."""
        return self.end - self.kmax

    def hit_prompt(self) -> array:
        return self.key + self.real[self.end:]
