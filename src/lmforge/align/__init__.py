"""Alignment: preference data, reward models, the DPO family, PPO and GRPO on the one training loop
(docs/alignment.md)."""
