"""PPO, GRPO and RLOO end to end on a tiny model: the mean reward of a simple reward function rises, KL stays
bounded, and bad settings are named."""

import pytest
import torch

from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer


def reward_fn(prompts, responses):
    """The share of ASCII characters in the response: a dense signal a random byte-level policy can climb."""
    return [sum(ord(c) < 128 for c in r) / max(1, len(r)) for r in responses]


@pytest.fixture()
def setup(tmp_path):
    tokenizer = build_byte_tokenizer()
    path = task.build_tiny_model_dir(str(tmp_path / "m"), vocab_size=len(tokenizer), seed=3, hidden_size=32)
    torch.manual_seed(0)
    return load_causal_lm(path), tokenizer


@pytest.mark.parametrize("algorithm, n_samples, kl_coef", [("ppo", 1, 0.0), ("grpo", 4, 0.01), ("rloo", 4, 0.0)])
def test_reward_rises(setup, algorithm, n_samples, kl_coef):
    model, tokenizer = setup
    config = PPOConfig(algorithm=algorithm, iterations=6, prompts_per_iteration=32 // n_samples,
                       n_samples=n_samples, max_new_tokens=12, lr=1e-2, critic_lr=1e-2, minibatch_size=8,
                       kl_in_reward=algorithm == "ppo", kl_reward_coef=0.01, kl_coef=kl_coef, seed=1)
    trainer = PPOTrainer(model, tokenizer, config, reward_fn=reward_fn)
    prompts = [task.format_prompt(p) for p in task.make_prompts(16, seed=0)]
    history = trainer.train(prompts, progress=False)
    first = sum(h["reward_mean"] for h in history[:2]) / 2
    last = sum(h["reward_mean"] for h in history[-2:]) / 2
    assert last > first + 0.08, [round(h["reward_mean"], 3) for h in history]
    assert all(abs(h["kl"]) < 50 for h in history)
    assert history[0]["logprob_mismatch_max"] < 1e-3  # rollout and training forward agree
    for key in ("clipfrac", "approx_kl", "policy_loss", "entropy", "tokens_per_s"):
        assert key in history[-1]


def test_bad_settings_are_named(setup):
    model, tokenizer = setup
    with pytest.raises(ValueError, match="n_samples must be >= 2 for grpo"):
        PPOConfig(algorithm="grpo", n_samples=1)
    with pytest.raises(ValueError, match="algorithm"):
        PPOConfig(algorithm="a2c")
    with pytest.raises(ValueError, match="exactly one of reward_model"):
        PPOTrainer(model, tokenizer, PPOConfig())
