"""TRL's GRPOTrainer, scoring only the completion positions on devices without Triton,
and optionally sampling and scoring every completion from a compressed prompt cache.

TRL 1.16 computes per-token log-probs through a fused, chunked LM head. With Triton (CUDA)
it projects only the positions that have a label; elsewhere it projects *every* position,
forward and backward, so on a CPU a 2.5k-token corpus prompt costs thousands of full-vocab
softmaxes per completion instead of a few dozen. A one-step SmolLM2 run did not finish in
8 minutes that way. Here the model returns logits for the completion positions only
(``logits_to_keep``), and log-probs and entropies are taken from them; the values are
TRL's (``tests/train/test_grpo.py`` compares them).

With ``compress`` (a spec such as snapkv:0.5), each prompt's documents are compressed after
its prefill, the way a compressed server would, and both the sampled completions and their
log-probs (policy, old policy and reference alike) come from that compressed cache, so the
policy is rewarded for answering from what the cache keeps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from trl import GRPOTrainer

from kvrag.compression import CompressionSpec
from kvrag.compression.capabilities import Target, check
from kvrag.train.compressed import continuation_logits, sample_compressed


class CompletionOnlyGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, compress: CompressionSpec | None = None,
                 spans: Mapping[tuple[int, ...], tuple[int, int]] | None = None, **kwargs):
        """``spans``: each training prompt's token ids -> its documents' token span, as
        kvrag encodes it (needed with ``compress``)."""
        super().__init__(*args, **kwargs)
        self.compress = compress
        self.spans = dict(spans or {})
        if compress is not None:
            check(compress, Target.TRAINING)
            if self.args.gradient_checkpointing:
                raise ValueError("GRPO with compression needs the prompt's KV cache, which "
                                 "gradient checkpointing drops; turn checkpointing off")
            if (self.top_p != 1.0 or self.top_k or self.min_p is not None
                    or self.repetition_penalty != 1.0):
                raise ValueError("GRPO with compression samples at a temperature only; leave "
                                 "top_p, top_k, min_p and repetition_penalty at their defaults")

    def _span(self, prompt: tuple[int, ...]) -> tuple[int, int]:
        try:
            return self.spans[prompt]
        except KeyError:
            raise ValueError("a training prompt's tokens differ from kvrag's encoding of it, "
                             "so its documents cannot be located for compression") from None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):
        if self.compress is None or images is not None or multimodal_fields:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                 num_generations, has_tool_images)
        model = self.accelerator.unwrap_model(self.model)
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for row, ids in enumerate(prompt_ids):
            rows_of.setdefault(tuple(ids), []).append(row)
        completions: list[list[int]] = [[] for _ in prompt_ids]
        for ids, rows in rows_of.items():
            sampled = sample_compressed(model, list(ids), self._span(ids), self.compress,
                                        len(rows), self.max_completion_length,
                                        self.temperature, set(self.eos_token_ids),
                                        tokenizer=self.processing_class)
            for row, completion in zip(rows, sampled, strict=True):
                completions[row] = completion
        return completions, None

    def _compressed_logps(self, model, input_ids, attention_mask, logits_to_keep,
                          compute_entropy):
        cut = input_ids.size(1) - logits_to_keep
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for row in range(input_ids.size(0)):
            prompt = input_ids[row, :cut][attention_mask[row, :cut].bool()]
            rows_of.setdefault(tuple(prompt.tolist()), []).append(row)
        logps = torch.empty(input_ids.size(0), logits_to_keep, device=input_ids.device)
        entropies = torch.empty_like(logps) if compute_entropy else None
        # a group's completions share one compressed prefill of their prompt
        for prompt, rows in rows_of.items():
            completions = input_ids[rows, cut:]
            with self.accelerator.autocast():
                logits = continuation_logits(
                    model, torch.tensor([prompt], device=input_ids.device), completions,
                    self._span(prompt), self.compress, self.processing_class)
            log_probs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            logps[rows] = log_probs.gather(-1, completions[..., None])[..., 0]
            if entropies is not None:
                entropies[rows] = -(log_probs.exp() * log_probs).sum(-1)
        return logps, entropies, None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False,
                                           compute_aux_loss=False, **multimodal):
        multimodal_given = any(v is not None for v in multimodal.values())
        if self.compress is not None and not compute_aux_loss and not multimodal_given:
            return self._compressed_logps(model, input_ids, attention_mask, logits_to_keep,
                                          compute_entropy)
        if (input_ids.device.type == "cuda" or compute_aux_loss
                or multimodal_given):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            mask = attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                # position t's logits predict token t + 1: keep one more, drop the last
                logits = model(input_ids=ids, attention_mask=mask,
                               logits_to_keep=logits_to_keep + 1).logits[:, :-1]
            log_probs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            targets = ids[:, -logits_to_keep:]
            logps.append(log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
            if compute_entropy:
                entropies.append(-(log_probs.exp() * log_probs).sum(-1))
        return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None)
