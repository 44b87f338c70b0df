"""LoRA fine-tuning for in-context retrieval (SFT, GRPO). Empty until issue 6."""
