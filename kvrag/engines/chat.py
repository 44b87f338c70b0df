"""Chat-templated prompt encoding and stop tokens, shared by every engine.

Both engines must see the same token ids and the same evictable span, or their
compression results could not be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrag.data.prompt import Prompt

# SmolLM2's GGUF tokenizer names <|im_start|> as eos; chat turns really end with this.
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class EncodedPrompt:
    """Chat-templated token ids and the half-open token span of the documents."""

    input_ids: list[int]
    context_start: int
    context_end: int

    @property
    def span(self) -> tuple[int, int]:
        return self.context_start, self.context_end


def encode_prompt(tokenizer, prompt: Prompt) -> EncodedPrompt:
    """Apply the chat template and locate the documents' tokens within it."""
    text = tokenizer.apply_chat_template(
        prompt.messages(), add_generation_prompt=True, tokenize=False
    )
    offset = text.index(prompt.text)
    start_char, end_char = (offset + c for c in prompt.context_span)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    # Only tokens wholly inside the documents are evictable; a token straddling a
    # boundary belongs to the header or the question, which are always kept.
    start = next(i for i, (a, _) in enumerate(spans) if a >= start_char)
    end = next((i for i, (_, b) in enumerate(spans) if b > end_char), len(spans))
    return EncodedPrompt(list(enc["input_ids"]), start, end)


class TokenizerMethods:
    """``tokenize`` and ``encode`` for an engine that holds its ``tokenizer``."""

    tokenizer: object

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        return encode_prompt(self.tokenizer, prompt)


def stop_ids(tokenizer, generation_eos: int | list[int] | None) -> set[int]:
    """The model's eos ids, the tokenizer's, and the end-of-turn token."""
    ids: set[int] = set()
    ids.update(generation_eos if isinstance(generation_eos, list)
               else [generation_eos] if generation_eos is not None else [])
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
