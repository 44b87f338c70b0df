"""Greedy generation with HF transformers on the CPU, prefill and decode timed apart."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvrag.data.prompt import Prompt
from kvrag.engines.base import Cost, Generation

# SmolLM2's GGUF tokenizer names <|im_start|> as eos; chat turns really end with this.
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class EncodedPrompt:
    """Chat-templated token ids and the half-open token span of the documents."""

    input_ids: list[int]
    context_start: int
    context_end: int


class HFEngine:
    name = "hf"

    def __init__(self, model_path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model.eval()
        self.stop_ids = self._stop_ids()
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        # keys + values, every layer, every KV head
        self.kv_bytes_per_token = (
            2 * cfg.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        )

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        """Apply the chat template and locate the documents' tokens within it."""
        text = self.tokenizer.apply_chat_template(
            prompt.messages(), add_generation_prompt=True, tokenize=False
        )
        offset = text.index(prompt.text)
        start_char, end_char = (offset + c for c in prompt.context_span)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        start = next(i for i, (a, b) in enumerate(spans) if b > start_char)
        end = next((i for i, (a, _) in enumerate(spans) if a >= end_char), len(spans))
        return EncodedPrompt(list(enc["input_ids"]), start, end)

    @torch.inference_mode()
    def generate(self, prompt: Prompt, max_new_tokens: int) -> Generation:
        ids = torch.tensor([self.encode(prompt).input_ids])
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        kv_tokens = cache.get_seq_length()
        t1 = time.perf_counter()
        new: list[int] = []
        next_id = int(out.logits[0, -1].argmax())
        while next_id not in self.stop_ids and len(new) < max_new_tokens:
            new.append(next_id)
            if len(new) == max_new_tokens:
                break
            out = self.model(
                input_ids=torch.tensor([[next_id]]), past_key_values=cache, use_cache=True
            )
            next_id = int(out.logits[0, -1].argmax())
        t2 = time.perf_counter()
        cost = Cost(
            prompt_tokens=ids.shape[1], kv_tokens=kv_tokens,
            kv_bytes=kv_tokens * self.kv_bytes_per_token,
            prefill_s=t1 - t0, decode_s=t2 - t1, new_tokens=len(new),
        )
        return Generation(self.tokenizer.decode(new, skip_special_tokens=True), cost)
