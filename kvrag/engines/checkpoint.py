"""What every engine reads from a checkpoint directory besides its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from kvrag.engines.chat import stop_ids


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one token's KV cache: ``layers`` x (keys + values) x heads x dim."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> KVGeometry:
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    def bytes_per_token_layer(self, dtype: torch.dtype) -> int:
        return 2 * self.kv_heads * self.head_dim * dtype.itemsize

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.bytes_per_token_layer(dtype) * self.layers


@dataclass(frozen=True)
class CheckpointSide:
    """Tokenizer, stop ids and KV geometry of a checkpoint directory (weights not read)."""

    tokenizer: object
    stop_ids: set[int]
    config: object
    kv: KVGeometry

    @classmethod
    def load(cls, model_path: str | Path) -> CheckpointSide:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        config = AutoConfig.from_pretrained(model_path)
        return cls(tokenizer, stop_ids(tokenizer, eos), config, KVGeometry.of(config))
