"""LoRA fine-tuning for in-context retrieval: target formats, examples, SFT and GRPO (with
their rewards), compression-aware training, held-out validation."""
