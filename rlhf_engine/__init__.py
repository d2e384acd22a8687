"""rlhf-engine: RLHF training (SFT, reward model, PPO/GRPO/RLOO) with fused Triton kernels and a paged KV cache."""

__version__ = "0.1.0"
