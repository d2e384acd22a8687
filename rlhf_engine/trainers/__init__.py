"""Training phases: SFT, reward model, DPO (offline, one shared loop in ``common``) and PPO/GRPO/RLOO (``ppo``)."""

from rlhf_engine.trainers.common import TrainConfig, Trainer
from rlhf_engine.trainers.dpo import DPOConfig, train_dpo
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_engine.trainers.reward import RewardConfig, train_reward_model
from rlhf_engine.trainers.sft import SFTConfig, sft_loss, train_sft

__all__ = ["DPOConfig", "PPOConfig", "PPOTrainer", "RewardConfig", "SFTConfig", "TrainConfig", "Trainer",
           "sft_loss", "train_dpo", "train_reward_model", "train_sft"]
