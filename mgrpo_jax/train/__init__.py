"""The M-GRPO trainer: trajectory alignment, per-agent updates, the training loop and its modes."""
