"""TRL's GRPOTrainer, scoring only the completion positions on devices without Triton.

TRL 1.16 computes per-token log-probs through a fused, chunked LM head. With Triton (CUDA)
it projects only the positions that have a label; elsewhere it projects *every* position,
forward and backward, so on a CPU a 2.5k-token corpus prompt costs thousands of full-vocab
softmaxes per completion instead of a few dozen. A one-step SmolLM2 run did not finish in
8 minutes that way. Here the model returns logits for the completion positions only
(``logits_to_keep``), and log-probs and entropies are taken from them; the values are
TRL's (``tests/train/test_grpo.py`` compares them).
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer


class CompletionOnlyGRPOTrainer(GRPOTrainer):
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False,
                                           compute_aux_loss=False, **multimodal):
        if (input_ids.device.type == "cuda" or compute_aux_loss
                or any(v is not None for v in multimodal.values())):
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
