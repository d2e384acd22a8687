"""Making experience: rollout correction and overlong shaping against float64 definitions written here; the
GRPO trainer with every policy loss, rollout correction, overlong shaping and truncated-completion masking."""

import math

import pytest
import torch

from rlhf_engine.config import ConfigError, load_config
from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm
from rlhf_engine.trainers.experience import overlong_penalty, rollout_correction
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer


def batch(b=6, t=11, scale=0.5):
    gen = torch.Generator().manual_seed(7)
    rollout = -torch.rand(b, t, generator=gen) * 3
    old = rollout + torch.randn(b, t, generator=gen) * scale
    mask = torch.arange(t)[None, :] < torch.randint(1, t + 1, (b,), generator=gen)[:, None]
    mask[2] = False  # a row without response tokens
    old[~mask] = float("nan")  # padding may hold anything
    return old, rollout, mask


@pytest.mark.parametrize("cap, low", [(2.0, None), (1.3, 0.9)])
def test_rollout_correction_matches_its_definitions(cap, low):
    old, rollout, mask = batch()
    lo = 1 / cap if low is None else low
    rho = torch.where(mask, (old.double() - rollout.double()).exp(), 0.0)
    seq = torch.tensor([math.exp(((old[i] - rollout[i])[mask[i]]).double().mean()) if mask[i].any() else 0.0
                        for i in range(len(mask))], dtype=torch.float64)

    weights, loss_mask, stats = rollout_correction(old, rollout, mask, "tis", cap=cap, low=low)
    torch.testing.assert_close(weights.double(), torch.where(mask, rho.clamp(max=cap), 0.0), atol=1e-6, rtol=1e-5)
    assert torch.equal(loss_mask, mask)
    assert stats["rollout_ratio_max"] == pytest.approx(float(rho[mask].max()), rel=1e-5)
    assert stats["rollout_weight_max"] == pytest.approx(min(float(rho[mask].max()), cap), rel=1e-5)

    weights, loss_mask, stats = rollout_correction(old, rollout, mask, "mis", cap=cap, low=low)
    keep = mask & (rho >= lo) & (rho <= cap)
    assert weights is None and torch.equal(loss_mask, keep)
    assert stats["rollout_masked_tokens"] == pytest.approx(float((mask & ~keep).sum() / mask.sum()))

    weights, loss_mask, stats = rollout_correction(old, rollout, mask, "seq-tis", cap=cap, low=low)
    torch.testing.assert_close(weights.double(), torch.where(mask, seq.clamp(max=cap)[:, None], 0.0), atol=1e-6,
                               rtol=1e-5)

    weights, loss_mask, stats = rollout_correction(old, rollout, mask, "seq-mis", cap=cap, low=low)
    keep_rows = (seq >= lo) & (seq <= cap)
    assert weights is None and torch.equal(loss_mask, mask & keep_rows[:, None])
    rows = mask.any(-1)
    assert stats["rollout_masked_seqs"] == pytest.approx(float((rows & ~keep_rows).sum() / rows.sum()))

    weights, loss_mask, stats = rollout_correction(old, rollout, mask, "none", cap=cap)
    assert weights is None and torch.equal(loss_mask, mask) and stats == {}
    with pytest.raises(ValueError, match="rollout_correction must be one of"):
        rollout_correction(old, rollout, mask, "is", cap=cap)


def test_overlong_penalty_is_dapos_linear_ramp():
    lengths = torch.tensor([0, 10, 12, 13, 15, 16])
    got = overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.125, -0.375, -0.5]))
    assert torch.equal(overlong_penalty(lengths, 16, 0, 0.5), torch.zeros(6))


def test_config_names_what_is_wrong(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algorithm: grpo\ntis_cap: 2.0\n")
    with pytest.raises(ConfigError, match="rollout_correction: tis with rollout_correction_cap"):
        load_config(PPOConfig, str(cfg), [])
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        PPOConfig(algorithm="grpo", policy_loss="grpo")
    with pytest.raises(ValueError, match="dual_clip applies to policy_loss: ppo only"):
        PPOConfig(algorithm="grpo", policy_loss="gspo", dual_clip=3.0)
    with pytest.raises(ValueError, match="agg_norm must be > 0 and needs agg: seq-mean-token-sum-norm"):
        PPOConfig(algorithm="grpo", agg_norm=48)
    with pytest.raises(ValueError, match="rollout_correction must be one of"):
        PPOConfig(algorithm="grpo", rollout_correction="is")
    with pytest.raises(ValueError, match="overlong_buffer must be an int in"):
        PPOConfig(algorithm="grpo", overlong_buffer=48, max_new_tokens=48)
    # keys that depend on each other may come in any order on the command line
    both = load_config(PPOConfig, None, ["--agg-norm", "48", "--agg", "seq-mean-token-sum-norm"])
    assert both.agg_norm == 48.0 and both.agg == "seq-mean-token-sum-norm"
    with pytest.raises(ConfigError, match="--agg-norm"):
        load_config(PPOConfig, None, ["--agg-norm", "many"])  # a wrong type still names its flag
    assert PPOConfig(algorithm="grpo", policy_loss="sapo").agg == "seq-mean-token-mean"
    # Dr. GRPO's constant: max_new_tokens unless set (a padded width would differ between ranks)
    assert PPOConfig(algorithm="grpo", agg="seq-mean-token-sum-norm", max_new_tokens=40).agg_norm == 40.0
    assert PPOConfig(algorithm="grpo", policy_loss="cispo").agg == "token-mean"


def reward_fn(prompts, responses):
    return [sum(ord(c) < 128 for c in r) / max(1, len(r)) for r in responses]


@pytest.mark.parametrize("policy_loss, extra", [
    ("gspo", dict(rollout_correction="seq-mis", rollout_correction_cap=1.5)),
    ("cispo", dict(rollout_correction="tis", clip_low=10.0, clip_high=0.28)),
    ("sapo", dict(rollout_correction="mis", overlong_buffer=4, mask_truncated=True)),
    ("ppo", dict(rollout_correction="seq-tis", agg="seq-mean-token-sum-norm", agg_norm=12.0, dual_clip=3.0)),
])
def test_grpo_runs_with_every_policy_loss(tmp_path, policy_loss, extra):
    tokenizer = build_byte_tokenizer()
    path = task.build_tiny_model_dir(str(tmp_path / "m"), vocab_size=len(tokenizer), seed=3, hidden_size=32)
    torch.manual_seed(0)
    config = PPOConfig(algorithm="grpo", iterations=2, prompts_per_iteration=4, n_samples=4, max_new_tokens=12,
                       lr=1e-3, minibatch_size=8, ppo_epochs=2, kl_coef=0.01, policy_loss=policy_loss, seed=1,
                       **extra)
    trainer = PPOTrainer(load_causal_lm(path), tokenizer, config, reward_fn=reward_fn)
    prompts = [task.format_prompt(p) for p in task.make_prompts(8, seed=0)]
    history = trainer.train(prompts, progress=False)
    last = history[-1]
    assert all(math.isfinite(v) for v in last.values() if isinstance(v, float))
    assert ("clipfrac" in last) == (policy_loss != "sapo")
    assert "rollout_ratio_mean" in last and 0.0 <= last["truncated"] <= 1.0
    if extra.get("rollout_correction", "").endswith("mis"):
        assert 0.0 <= last["rollout_masked_tokens"] <= 1.0
    if "overlong_buffer" in extra:
        assert last["overlong_penalty"] <= 0.0


def flat_or_ascii(prompts, responses):
    """Every sample of a prompt ending in '#' scores 0.5 (a group with no advantage); the others score their
    share of ASCII characters, which differs between samples."""
    return [0.5 if p.endswith("#") else sum(ord(c) < 128 for c in r) / max(1, len(r))
            for p, r in zip(prompts, responses, strict=True)]


def test_dynamic_sampling_drops_groups_without_signal(tmp_path):
    tokenizer = build_byte_tokenizer()
    path = task.build_tiny_model_dir(str(tmp_path / "m"), vocab_size=len(tokenizer), seed=3, hidden_size=32)
    torch.manual_seed(0)
    base = [task.format_prompt(p) for p in task.make_prompts(8, seed=0)]
    prompts = base[:4] + [p + "#" for p in base[4:]]
    config = PPOConfig(algorithm="grpo", iterations=3, prompts_per_iteration=4, n_samples=4, max_new_tokens=10,
                       minibatch_size=16, dynamic_sampling=True, max_sampling_rounds=6, seed=2)
    trainer = PPOTrainer(load_causal_lm(path), tokenizer, config, reward_fn=flat_or_ascii)
    seen = []

    def record(metrics):
        seen.append(list(trainer.last_rollout["prompts"]))

    history = trainer.train(prompts, progress=False, on_step=record)
    assert sum(h["groups_dropped"] for h in history) > 0
    assert any(h["sampling_rounds"] > 1 and h["groups_kept"] == 4 for h in history)  # refilled from fresh prompts
    for h, kept in zip(history, seen, strict=True):
        assert not any(p.endswith("#") for p in kept)  # no group without signal reached the update
        assert len(kept) == h["groups_kept"] * 4 and h["sampling_rounds"] <= 6
        if h["groups_kept"] == 4:
            assert not h.get("skipped_iteration")


def test_dynamic_sampling_with_no_signal_skips_the_iteration(tmp_path):
    tokenizer = build_byte_tokenizer()
    path = task.build_tiny_model_dir(str(tmp_path / "m"), vocab_size=len(tokenizer), seed=3, hidden_size=32)
    prompts = [task.format_prompt(p) + "#" for p in task.make_prompts(4, seed=0)]
    config = PPOConfig(algorithm="grpo", iterations=2, prompts_per_iteration=2, n_samples=2, max_new_tokens=6,
                       dynamic_sampling=True, max_sampling_rounds=2, seed=0, adaptive_kl_target=0.1)
    trainer = PPOTrainer(load_causal_lm(path), tokenizer, config, reward_fn=flat_or_ascii)
    history = trainer.train(prompts, progress=False)
    assert [h["skipped_iteration"] for h in history] == [1.0, 1.0]
    assert [h["groups_kept"] for h in history] == [0.0, 0.0] and history[0]["groups_dropped"] == 4
    with pytest.raises(ValueError, match="dynamic_sampling needs groups"):
        PPOConfig(algorithm="ppo", dynamic_sampling=True)
