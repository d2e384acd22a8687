"""PPO, GRPO and RLOO: one loop. Rollout on the paged KV cache, score, KL against the frozen reference,
advantages (GAE over a critic for PPO; group-relative for GRPO/RLOO), then epochs of minibatches over the fused
``ppo_policy_loss`` (and ``value_loss`` for the critic).

    trainer = PPOTrainer(policy, tokenizer, PPOConfig(algorithm="grpo", n_samples=8), reward_fn=my_fn)
    history = trainer.train(prompts)          # prompts: list[str]; one metrics dict per iteration

Per-token tensors live in "target space": position t of a [B, L-1] tensor is the prediction of token t + 1 of
the [B, L] sequence prompt + response + padding; ``mask`` is 1 on response tokens.

The reward is a model (a ScalarHeadModel scoring prompt + response) or any callable
``(prompts, responses) -> list[float]``. KL to the reference goes either into the per-token reward
(``kl_in_reward``, k1 by default, fixed or adaptive coefficient) or into the loss (``kl_coef``, k3 by default).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch

from rlhf_engine.models.heads import ScalarHeadModel, position_ids_for
from rlhf_engine.ops import (
    gae,
    group_advantages,
    kl_penalty,
    linear_logprobs,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)
from rlhf_engine.rollout import RolloutEngine, SamplingParams

ALGORITHMS = ("ppo", "grpo", "rloo")


@dataclass
class PPOConfig:
    algorithm: str = "ppo"
    iterations: int = 20
    prompts_per_iteration: int = 8
    n_samples: int = 1  # samples per prompt; GRPO and RLOO need >= 2
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    ppo_epochs: int = 2
    minibatch_size: int = 16  # sequences

    # NOTE: validated in __post_init__; minibatch_size too (below)
    lr: float = 1e-4
    critic_lr: float = 1e-4
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    vf_clip: float | None = 0.2
    agg: str = "token-mean"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_in_reward: bool = True  # PPO: KL folded into the per-token reward
    kl_reward_coef: float = 0.05
    kl_reward_kind: str = "k1"
    adaptive_kl_target: float | None = None  # adapts kl_reward_coef towards this KL per sequence
    kl_coef: float = 0.0  # KL as a loss term (GRPO's usual choice)
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None  # truncated importance sampling against the rollout's own log-probs
    max_grad_norm: float = 1.0
    max_prompt_length: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"PPOConfig.algorithm must be one of {list(ALGORITHMS)}, found {self.algorithm!r}")
        if self.algorithm in ("grpo", "rloo") and self.n_samples < 2:
            raise ValueError(f"PPOConfig.n_samples must be >= 2 for {self.algorithm}, found {self.n_samples}")
        for name in ("iterations", "prompts_per_iteration", "n_samples", "max_new_tokens", "ppo_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive int, found {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 (greedy has no gradient), found {self.temperature}")
        if isinstance(self.minibatch_size, bool) or not isinstance(self.minibatch_size, int) or self.minibatch_size < 1:
            raise ValueError(f"PPOConfig.minibatch_size must be a positive int, found {self.minibatch_size!r}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"PPOConfig.tis_cap must be > 0, found {self.tis_cap}")


def _nonfinite(name: str, value: torch.Tensor, iteration: int) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"iteration {iteration}: {name} is not finite; lower lr or check the reward")


class PPOTrainer:
    """Holds the policy (trained in place), the frozen reference, the critic (PPO) and the rollout engine."""

    def __init__(self, policy, tokenizer, config: PPOConfig, *, reward_model=None, reward_fn=None, critic=None):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("PPOTrainer: pass exactly one of reward_model (a ScalarHeadModel) or reward_fn")
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer
        self.reward_model = reward_model
        self.reward_fn = reward_fn
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.critic = None
        if config.algorithm == "ppo":
            if critic is None:
                critic = ScalarHeadModel(copy.deepcopy(reward_model.lm if reward_model is not None else policy))
                if reward_model is not None:
                    critic.head.load_state_dict(reward_model.head.state_dict())
            self.critic = critic
            self.critic_optimizer = torch.optim.AdamW(critic.trainable_parameters(), lr=config.critic_lr)
        self.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr)
        self.engine = RolloutEngine(policy)
        self.kl_reward_coef = config.kl_reward_coef
        self.rng = random.Random(config.seed)
        self.iteration = 0
        self.last_rollout: dict = {}  # prompts, responses and scores of the latest iteration

    # ------------------------------------------------------------------------------------------------------------
    def _encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)[-(self.config.max_prompt_length - 1) :]
        return ([self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []) + ids

    def _logprobs(self, model, input_ids, attention_mask, targets, *, entropy=False):
        """log-probs (and entropy) of ``targets`` [B, L-1] under ``model`` at the sampling temperature."""
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_for(attention_mask))
        head = model.get_output_embeddings()
        return linear_logprobs(out.last_hidden_state[:, :-1], head.weight, targets, bias=head.bias,
                               temperature=self.config.temperature, return_entropy=entropy)

    def _scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if self.reward_fn is not None:
            scores = torch.tensor([float(s) for s in self.reward_fn(prompts, responses)], dtype=torch.float32)
            if scores.shape[0] != len(prompts):
                raise ValueError(f"reward_fn returned {scores.shape[0]} scores for {len(prompts)} responses")
            return scores
        from rlhf_engine.trainers.reward import score_texts

        return score_texts(self.reward_model, self.tokenizer, prompts, responses, self.config.max_prompt_length
                           + self.config.max_new_tokens).cpu()

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict:
        """Generates, scores and prepares one iteration's batch (everything the update needs)."""
        cfg = self.config
        t0 = time.perf_counter()
        prompt_ids = [self._encode_prompt(p) for p in prompts]
        eos = self.tokenizer.eos_token_id
        params = SamplingParams(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop_token_ids=(eos,) if eos is not None else (),
                                seed=self.rng.randrange(2**31))
        outputs = self.engine.generate(prompt_ids, params)
        rollout_seconds = time.perf_counter() - t0
        rows, texts_p, texts_r = [], [], []
        for prompt, out in zip(prompts, outputs, strict=True):
            for s in out.samples:
                rows.append((out.prompt_token_ids, s))
                texts_p.append(prompt)
                texts_r.append(self.tokenizer.decode([t for t in s.token_ids if t != eos], skip_special_tokens=True))
        width = max(len(p) + len(s.token_ids) for p, s in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        targets = torch.full((b, width - 1), -100, dtype=torch.long)
        rollout_logp = torch.zeros((b, width - 1))
        last = torch.zeros(b, dtype=torch.long)
        for i, (p, s) in enumerate(rows):
            seq = p + s.token_ids
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
            targets[i, len(p) - 1 : len(seq) - 1] = torch.tensor(s.token_ids)
            rollout_logp[i, len(p) - 1 : len(seq) - 1] = torch.tensor(s.logprobs)
            last[i] = len(seq) - 2
        mask = targets != -100
        device = next(self.policy.parameters()).device
        input_ids, attention_mask, targets = input_ids.to(device), attention_mask.to(device), targets.to(device)
        old_logp = self._logprobs(self.policy, input_ids, attention_mask, targets)
        ref_logp = self._logprobs(self.reference, input_ids, attention_mask, targets)
        scores = self._scores(texts_p, texts_r).to(device)
        _nonfinite("reward", scores, self.iteration)
        mask, rollout_logp, last = mask.to(device), rollout_logp.to(device), last.to(device)
        kl = kl_penalty(old_logp, ref_logp, cfg.kl_reward_kind) * mask
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, targets=targets, mask=mask,
                     old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp)
        if cfg.algorithm == "ppo":
            values = self.critic.values(input_ids, attention_mask)[:, :-1] * mask
            rewards = torch.zeros_like(old_logp)
            rewards[torch.arange(b, device=device), last] = scores
            if cfg.kl_in_reward:
                rewards = rewards - self.kl_reward_coef * kl
            advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            batch.update(values=values, returns=returns)
        else:
            group = group_advantages(scores, cfg.n_samples, kind=cfg.algorithm)
            advantages = group[:, None].expand_as(old_logp) * mask
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        batch["advantages"] = advantages
        seq_kl = (kl.sum(-1)).mean()
        stats = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std().item() if b > 1 else 0.0,
            "kl": seq_kl.item(),
            "response_length": mask.sum(-1).float().mean().item(),
            "logprob_mismatch_max": ((old_logp - rollout_logp).abs() * mask).max().item(),
            "rollout_seconds": rollout_seconds,
            "tokens_per_s": self.engine.stats["decode_tokens"] / max(rollout_seconds, 1e-9),
        }
        return {"batch": batch, "stats": stats, "responses": texts_r, "prompts": texts_p, "scores": scores}

    def update(self, batch: dict) -> dict:
        """``ppo_epochs`` passes of minibatches over the policy loss (and the critic's value loss)."""
        cfg = self.config
        b = batch["input_ids"].shape[0]
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(b, generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
            for start in range(0, b, cfg.minibatch_size):
                idx = order[start : start + cfg.minibatch_size].to(batch["input_ids"].device)
                mb = {k: v[idx] for k, v in batch.items()}
                logp, entropy = self._logprobs(self.policy, mb["input_ids"], mb["attention_mask"], mb["targets"],
                                               entropy=True)
                advantages = mb["advantages"]
                if cfg.tis_cap is not None:
                    weight = torch.exp(mb["old_logp"] - mb["rollout_logp"]).clamp(max=cfg.tis_cap) * mb["mask"]
                    advantages = advantages * weight
                loss, stats = ppo_policy_loss(
                    logp, mb["old_logp"], advantages, mb["mask"], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                    dual_clip=cfg.dual_clip, ref_logp=mb["ref_logp"] if cfg.kl_coef else None, kl_coef=cfg.kl_coef,
                    kl_kind=cfg.kl_kind, agg=cfg.agg,
                )
                entropy_mean = masked_mean(entropy, mb["mask"])
                total = loss - cfg.entropy_coef * entropy_mean
                _nonfinite("policy loss", total, self.iteration)
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                _nonfinite("policy grad norm", grad_norm, self.iteration)
                self.optimizer.step()
                row = {"policy_loss": loss.item(), "entropy": entropy_mean.item(), "grad_norm": float(grad_norm)}
                row.update({k: float(v) for k, v in stats.items()})
                if self.critic is not None:
                    values = self.critic.values(mb["input_ids"], mb["attention_mask"])[:, :-1]
                    vloss, vstats = value_loss(values, mb["values"], mb["returns"], mb["mask"], clip=cfg.vf_clip)
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    vloss.backward()
                    torch.nn.utils.clip_grad_norm_(self.critic.trainable_parameters(), cfg.max_grad_norm)
                    self.critic_optimizer.step()
                    row.update(value_loss=vloss.item(), vf_clipfrac=float(vstats["clipfrac"]))
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in sums.items()}

    def step(self, prompts: list[str]) -> dict:
        t0 = time.perf_counter()
        result = self.rollout(prompts)
        self.last_rollout = {k: result[k] for k in ("prompts", "responses", "scores")}
        t1 = time.perf_counter()
        metrics = {"iteration": self.iteration, **result["stats"], **self.update(result["batch"])}
        metrics["train_seconds"] = time.perf_counter() - t1
        metrics["seconds"] = time.perf_counter() - t0
        if self.config.adaptive_kl_target is not None and self.config.kl_in_reward:
            # proportional controller (Ziegler et al.): move the coefficient towards the target KL
            error = max(-0.2, min(0.2, metrics["kl"] / self.config.adaptive_kl_target - 1.0))
            self.kl_reward_coef *= 1.0 + 0.1 * error
        metrics["kl_reward_coef"] = self.kl_reward_coef
        self.iteration += 1
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FloatingPointError(f"iteration {metrics['iteration']}: {key} is not finite")
        return metrics

    def train(self, prompts: list[str], *, progress: bool = True, on_step=None) -> list[dict]:
        if not prompts:
            raise ValueError("PPOTrainer.train: prompts is empty")
        from tqdm.auto import tqdm

        history = []
        bar = tqdm(range(self.config.iterations), desc=self.config.algorithm, disable=not progress, dynamic_ncols=True)
        for _ in bar:
            chosen = [self.rng.choice(prompts) for _ in range(self.config.prompts_per_iteration)]
            metrics = self.step(chosen)
            history.append(metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
            if on_step is not None:
                on_step(metrics)
        return history
