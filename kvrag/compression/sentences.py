"""Sentence ends in token ids, for ``chunk=sentence`` (select.py's chunk boundaries)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from kvrag.compression.spec import SENTENCE

ENDINGS = (".", "!", "?")
CLOSERS = "\"')]»”’"  # a quote or bracket after the full stop still ends the sentence


@lru_cache(maxsize=4)
def sentence_end_ids(tokenizer) -> frozenset[int]:
    """Vocabulary ids whose text ends a sentence (``.``, ``!`` or ``?``, perhaps before a
    closing quote or bracket) or a line."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, text in enumerate(texts)
                     if "\n" in text or text.rstrip().rstrip(CLOSERS).endswith(ENDINGS))


def sentence_ends(token_ids: Sequence[int] | torch.Tensor, tokenizer) -> torch.Tensor:
    """bool [n]: which of ``token_ids`` end a sentence."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
    ends = torch.tensor(sorted(sentence_end_ids(tokenizer)), dtype=torch.long)
    return torch.isin(ids, ends)


def sentence_ends_for(spec, token_ids: Sequence[int] | torch.Tensor,
                      tokenizer) -> torch.Tensor | None:
    """What ``kept_positions`` needs for ``spec``: the sentence ends if it chunks by
    sentence (the tokenizer then must be given), else None."""
    if spec is None or spec.chunk != SENTENCE:
        return None
    if tokenizer is None:
        raise ValueError(f"{spec.name} chunks by sentence, which needs the tokenizer; "
                         "this engine runs without one")
    return sentence_ends(token_ids, tokenizer)
