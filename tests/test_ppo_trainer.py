"""PPO, GRPO and RLOO end to end on a tiny model: the mean reward of a simple reward function rises, KL stays
bounded, and bad settings are named. The model of ``setup`` lives on RLHF_ENGINE_TEST_MODEL_DEVICE (`make
gpu-check` runs ``test_reward_rises`` on cuda)."""

import pytest
import torch
from rollout_reference import DEVICE

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
    return load_causal_lm(path, device=DEVICE), tokenizer


@pytest.mark.parametrize("algorithm, n_samples, kl_coef", [("ppo", 1, 0.0), ("grpo", 4, 0.01), ("rloo", 4, 0.0),
                                                           ("reinforce++", 1, 0.0), ("remax", 2, 0.0)])
def test_reward_rises(setup, algorithm, n_samples, kl_coef):
    model, tokenizer = setup
    config = PPOConfig(algorithm=algorithm, iterations=6, prompts_per_iteration=32 // n_samples,
                       n_samples=n_samples, max_new_tokens=12, lr=1e-2, critic_lr=1e-2, minibatch_size=8,
                       kl_in_reward=algorithm in ("ppo", "reinforce++"), kl_reward_coef=0.01, kl_coef=kl_coef, seed=1,
                       tf32=False)  # on a GPU: the rollout / training agreement checked below is fp32's, not TF32's
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


def test_on_policy_update_reuses_its_own_forward(setup, tmp_path):
    """With one epoch and one minibatch the old log-probs are the update's own (detached) forward: one policy
    forward fewer a step, the same parameters as recomputing them (and as running every row's prompt, rather than
    sharing each prompt's KV with its samples), and the rollout/training mismatch still logged."""
    from rlhf_engine.demo import task as demo_task

    prompts = [demo_task.format_prompt(p) for p in demo_task.make_prompts(8, seed=0)]
    results = []
    for reuse, share in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = load_causal_lm(setup[0].name_or_path)
        config = PPOConfig(algorithm="grpo", iterations=1, prompts_per_iteration=4, n_samples=2, max_new_tokens=8,
                           ppo_epochs=1, minibatch_size=8, lr=1e-3, kl_coef=0.05, seed=3, reuse_logprobs=reuse,
                           share_prompts=share)
        trainer = PPOTrainer(model, setup[1], config, reward_fn=reward_fn)
        calls = []
        forward = trainer._logprobs
        trainer._logprobs = lambda *a, _c=calls, _f=forward, **k: _c.append(1) or _f(*a, **k)
        metrics = trainer.step(prompts[:4])
        results.append(([p.detach().clone() for p in model.parameters()], metrics, len(calls)))
    (reused, m_reused, n_reused), (recomputed, m_recomputed, n_recomputed) = results
    assert n_reused == n_recomputed - 1  # the old-policy forward is skipped
    assert m_reused["logprob_mismatch_max"] < 1e-3 and m_reused["clipfrac"] == 0.0
    for a, b in zip(reused, recomputed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_nonfinite_rewards_stop_or_skip(setup):
    """A NaN reward stops the run naming the quantity and the iteration, or with skip_nonfinite the iteration is
    skipped (no update) and counted."""
    model, tokenizer = setup
    prompts = [task.format_prompt(p) for p in task.make_prompts(4, seed=0)]
    nan_reward = lambda p, r: [float("nan")] + [0.5] * (len(r) - 1)  # noqa: E731
    config = dict(algorithm="grpo", iterations=1, prompts_per_iteration=2, n_samples=2, max_new_tokens=6, lr=1e-3)
    with pytest.raises(FloatingPointError, match="iteration 0: a reward is not finite"):
        PPOTrainer(model, tokenizer, PPOConfig(**config), reward_fn=nan_reward).step(prompts[:2])
    before = [p.detach().clone() for p in model.parameters()]
    trainer = PPOTrainer(model, tokenizer, PPOConfig(**config, skip_nonfinite=True), reward_fn=nan_reward)
    metrics = trainer.step(prompts[:2])
    assert metrics["skipped_iteration"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_ppo_logs_explained_variance(setup):
    model, tokenizer = setup
    config = PPOConfig(iterations=1, prompts_per_iteration=4, max_new_tokens=6, lr=1e-3, critic_lr=1e-3)
    metrics = PPOTrainer(model, tokenizer, config, reward_fn=reward_fn).step(
        [task.format_prompt(p) for p in task.make_prompts(4, seed=0)])
    assert metrics["explained_variance"] <= 1.0 and metrics["skipped"] == 0.0
    for key in ("reward_std", "response_length", "rollout_seconds", "train_seconds", "tokens_per_s", "value_loss"):
        assert key in metrics, key


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prompt_forward_equals_the_plain_one(kind):
    """Each prompt run once with its KV shared by its n samples: the same log-probs, entropies and gradients as
    running every row whole (unequal prompt and response lengths, right padding)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from rlhf_engine.models.heads import CausalLMLogprobs, position_ids_for

    torch.manual_seed(0)
    if kind == "llama":
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))
    else:
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        initializer_range=0.2, bos_token_id=0, eos_token_id=0))
    lm.eval()  # GPT-2's dropout would make the two passes differ by chance
    n, prompt_lengths = 3, [5, 9, 2]
    rows = []
    for length in prompt_lengths:
        prompt = torch.randint(0, 97, (length,)).tolist()
        rows += [(prompt, torch.randint(0, 97, (int(torch.randint(1, 8, ())),)).tolist()) for _ in range(n)]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), -100)
    for b, (p, r) in enumerate(rows):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        mask[b, : len(p) + len(r)] = 1
        targets[b, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(r)
    module = CausalLMLogprobs(lm)
    results = []
    for shared in (None, (n, prompt_lengths)):
        logp, entropy = module(ids, mask, targets, position_ids=position_ids_for(mask), return_entropy=True,
                               shared_prompts=shared)
        (0.7 * logp.sum() + 0.1 * entropy.sum()).backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in lm.parameters()]))
        lm.zero_grad()
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = results
    torch.testing.assert_close(logp_b, logp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=1e-5)
    assert torch.equal(logp_b != 0, targets != -100)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def test_reinforce_pp_and_remax_advantages(setup):
    """REINFORCE++ without KL or whitening: every response token's advantage is the sequence's return, its score
    (gamma 1); with the KL in the reward, the discounted returns of the shaped rewards. ReMax: each sample's score
    minus the score of its prompt's greedy response."""
    from rlhf_engine.ops import kl_penalty, reinforce_pp_returns
    from rlhf_engine.rollout import SamplingParams

    model, tokenizer = setup
    prompts = [task.format_prompt(p) for p in task.make_prompts(3, seed=1)]
    config = PPOConfig(algorithm="reinforce++", n_samples=2, prompts_per_iteration=3, max_new_tokens=8,
                       whiten_advantages=False, kl_in_reward=False, seed=0)
    out = PPOTrainer(model, tokenizer, config, reward_fn=length_reward).rollout(prompts)
    batch, mask = out["batch"], out["batch"]["mask"]
    torch.testing.assert_close(batch["advantages"], out["scores"][:, None] * mask)

    config = PPOConfig(algorithm="reinforce++", n_samples=2, prompts_per_iteration=3, max_new_tokens=8,
                       whiten_advantages=False, kl_reward_coef=0.1, gamma=0.9, seed=0)
    out = PPOTrainer(model, tokenizer, config, reward_fn=length_reward).rollout(prompts)
    batch, mask = out["batch"], out["batch"]["mask"]
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    last = mask.float().cumsum(-1).argmax(-1)  # each row's last response token
    rewards[torch.arange(len(last)), last] = out["scores"]
    rewards = rewards - 0.1 * kl_penalty(batch["old_logp"], batch["ref_logp"], "k1") * mask
    torch.testing.assert_close(batch["advantages"], reinforce_pp_returns(rewards, mask, 0.9, whiten=False))

    config = PPOConfig(algorithm="remax", n_samples=2, prompts_per_iteration=3, max_new_tokens=8,
                       whiten_advantages=False, seed=0)
    trainer = PPOTrainer(model, tokenizer, config, reward_fn=length_reward)
    out = trainer.rollout(prompts)
    greedy = trainer.engine.generate([trainer._encode_prompt(p) for p in prompts],
                                     SamplingParams(n=1, temperature=0.0, max_new_tokens=8,
                                                    stop_token_ids=(tokenizer.eos_token_id,)))
    eos = tokenizer.eos_token_id
    baseline = torch.tensor(length_reward(prompts, [tokenizer.decode([t for t in g.samples[0].token_ids if t != eos],
                                                                     skip_special_tokens=True) for g in greedy]))
    mask = out["batch"]["mask"]
    expected = (out["scores"] - baseline.repeat_interleave(2))[:, None] * mask
    torch.testing.assert_close(out["batch"]["advantages"], expected)
    assert out["stats"]["baseline_reward_mean"] == pytest.approx(float(baseline.mean()))

    # with overlong shaping the greedy baseline is shaped too: a sample as long as its greedy response gains 0
    from rlhf_engine.trainers.experience import overlong_penalty

    config = PPOConfig(algorithm="remax", n_samples=2, prompts_per_iteration=3, max_new_tokens=8,
                       whiten_advantages=False, overlong_buffer=4, seed=0)
    trainer = PPOTrainer(model, tokenizer, config, reward_fn=length_reward)
    out = trainer.rollout(prompts)
    lengths = torch.tensor([len(g.samples[0].token_ids) for g in greedy])
    shaped = baseline + overlong_penalty(lengths, 8, 4, 1.0)
    expected = (out["scores"] - shaped.repeat_interleave(2))[:, None] * out["batch"]["mask"]
    torch.testing.assert_close(out["batch"]["advantages"], expected)
