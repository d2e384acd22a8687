"""Training phases. SFT lands first; reward-model and PPO/GRPO/RLOO phases share its conventions."""

from rlhf_engine.trainers.sft import SFTConfig, sft_loss, train_sft

__all__ = ["SFTConfig", "sft_loss", "train_sft"]
