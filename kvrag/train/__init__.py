"""LoRA fine-tuning for in-context retrieval: target formats, examples, GRPO rewards."""
