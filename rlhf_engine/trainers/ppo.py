"""PPO, GRPO, RLOO, REINFORCE++ and ReMax: one loop. Rollout on the paged KV cache, score, KL against the frozen
reference, advantages (GAE over a critic for PPO; group-relative for GRPO/RLOO; whitened discounted returns of
the KL-shaped reward for REINFORCE++; a greedy response's reward as the baseline for ReMax), then epochs of
minibatches over the fused ``ppo_policy_loss`` (and ``value_loss`` for the critic).

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

from rlhf_engine.checkpoint import load_checkpoint_state, save_checkpoint
from rlhf_engine.data.jsonl import as_records
from rlhf_engine.distributed import DistInfo, SavesState, full_state, load_optimizer_state, wrap
from rlhf_engine.models.heads import CausalLMLogprobs, ScalarHeadModel
from rlhf_engine.models.loading import checkpoint_in_eval_mode, enable_gradient_checkpointing, prepare_lora
from rlhf_engine.models.lora import TRAINED_ADAPTERS_ERROR, has_lora, trained_adapters, unwrap_peft
from rlhf_engine.ops import (
    AGG_MODES,
    POLICY_LOSSES,
    masked_mean,
    ppo_policy_loss,
    value_loss,
)
from rlhf_engine.precision import LossScaler, RolloutWeights, frozen_copy, fsdp_mixed_precision
from rlhf_engine.rewards.scoring import RewardScorer
from rlhf_engine.rollout import RolloutEngine
from rlhf_engine.trainers.common import RunConfig, open_metrics, option, with_config_tf32
from rlhf_engine.trainers.experience import ROLLOUT_CORRECTIONS, ExperienceMaker, rollout_correction

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce++", "remax")


# samples per prompt when n_samples is not set: a group of 8 for the group estimators, as TRL's GRPOTrainer
DEFAULT_N_SAMPLES = {"ppo": 1, "grpo": 8, "rloo": 8, "reinforce++": 1, "remax": 1}


@dataclass
class PPOConfig(RunConfig):
    model: str = option("", "policy to start from: the SFT model directory (also the frozen reference)")
    data: str = option("", "prompts: JSONL ({\"prompt\": ...} a line; other fields reach reward_fn), "
                            "Parquet, CSV or a datasets directory")
    save_every: int = option(0, "checkpoint every this many iterations (0: only at the end)")
    reward_model: str = option("", "reward model directory (saved by `rlhf-engine rm`); or set reward_fn")
    reward_fn: str = option("", "a Python reward function (prompts, responses, **row_fields) -> list[float]: "
                                 "'package.module:function' or 'path/to/file.py:function'")
    reward_workers: int = option(0, "worker processes running reward_fn (spawned; 0: in this process), overlapped "
                                    "with the log-prob passes")
    reward_timeout: float | None = option(None, "seconds a reward_fn call may take in a worker (None: no limit)")
    reward_on_error: float | None = option(None, "score of a sample whose reward_fn call failed or timed out "
                                                 "(counted as reward_errors); None: the failure stops the run")
    critic_model: str = option("", "PPO: critic start (a reward/value model directory; default: the reward model, "
                                    "else the policy body with a new head)")
    algorithm: str = option("ppo", "ppo (critic + GAE) | grpo | rloo (group advantages over n_samples, no critic) | "
                                   "reinforce++ (whitened discounted returns of the KL-shaped reward, no critic) | "
                                   "remax (a greedy sample's reward as the baseline, no critic)")
    iterations: int = option(20, "rollout + update iterations")
    prompts_per_iteration: int = option(8, "prompts sampled each iteration")
    n_samples: int | None = option(None, "samples per prompt (default: 1 for ppo, 8 for grpo and rloo, whose group "
                                         "advantages need >= 2)")
    max_new_tokens: int = option(48, "tokens generated per sample at most")
    temperature: float = option(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature")
    top_p: float = option(1.0, "nucleus sampling threshold")
    ppo_epochs: int = option(2, "passes over each iteration's samples")
    minibatch_size: int = option(16, "sequences per optimizer step")
    lr: float = option(1e-6, "policy learning rate (AdamW)")
    critic_lr: float = option(1e-5, "critic learning rate (AdamW)")
    clip_low: float = option(0.2, "ratio clip below: 1 - clip_low")
    clip_high: float | None = option(None, "ratio clip above: 1 + clip_high (default: clip_low; DAPO's clip-higher)")
    dual_clip: float | None = option(None, "dual-clip bound c > 1 for negative advantages (None: off)")
    vf_clip: float | None = option(0.2, "value clipping around the rollout's values (None: off)")
    policy_loss: str = option("ppo", "policy loss: ppo (clipped ratio) | gspo (sequence ratio) | cispo (clipped IS "
                                     "weight on logp) | sapo (soft gate); see rlhf_engine.ops.ppo_policy_loss")
    agg: str | None = option(None, "loss aggregation: token-mean | token-sum | seq-mean-token-sum | "
                                   "seq-mean-token-mean | seq-mean-token-sum-norm (default: seq-mean-token-mean for "
                                   "gspo and sapo, token-mean otherwise)")
    agg_norm: float | None = option(None, "seq-mean-token-sum-norm: divide by this fixed length (default: "
                                          "max_new_tokens, as Dr. GRPO)")
    sapo_tau_pos: float = option(1.0, "sapo: gate temperature for tokens with a positive advantage")
    sapo_tau_neg: float = option(1.05, "sapo: gate temperature for tokens with a non-positive advantage")
    rollout_correction: str = option("none", "importance correction for the rollout engine's sampling policy "
                                             "against the trained one: none | tis | mis (token truncate / mask) | "
                                             "seq-tis | seq-mis (per sequence, geometric mean of the token ratios)")
    rollout_correction_cap: float = option(2.0, "upper bound of the correction weight (tis: truncated to it; mis: "
                                                "tokens or sequences above it are masked)")
    rollout_correction_low: float | None = option(None, "mis / seq-mis: ratios below this are masked too (default: "
                                                        "1 / rollout_correction_cap)")
    overlong_buffer: int = option(0, "DAPO's soft overlong punishment: responses longer than max_new_tokens - "
                                     "overlong_buffer lose up to overlong_penalty, linearly (0: off)")
    overlong_penalty: float = option(1.0, "the largest overlong punishment, at max_new_tokens")
    mask_truncated: bool = option(False, "drop completions cut at max_new_tokens (no stop token) from the loss")
    dynamic_sampling: bool = option(False, "grpo / rloo (DAPO): drop groups whose rewards are all equal and sample "
                                           "more prompts until the batch is full or max_sampling_rounds have run")
    max_sampling_rounds: int = option(3, "dynamic_sampling: sampling rounds per iteration at most")
    gamma: float = option(1.0, "GAE discount")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "normalise advantages over the batch's response tokens")
    kl_in_reward: bool = option(True, "ppo and reinforce++: subtract kl_reward_coef * KL to the reference from each "
                                      "token's reward")
    kl_reward_coef: float = option(0.05, "coefficient of the KL in the reward (the start value when adaptive)")
    kl_reward_kind: str = option("k1", "estimator of the KL in the reward: k1 | k2 | k3 | abs")
    adaptive_kl_target: float | None = option(None, "adapt kl_reward_coef towards this KL per sequence (the "
                                                    "kl_reward metric; None: fixed)")
    kl_coef: float = option(0.0, "coefficient of the KL as a loss term (GRPO's usual choice)")
    kl_kind: str = option("k3", "estimator of the KL loss term: k1 | k2 | k3 | abs")
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    max_grad_norm: float = option(1.0, "gradient-norm clipping threshold")
    skip_nonfinite: bool = option(False, "skip a minibatch whose loss or gradient is not finite (and an iteration "
                                         "whose rewards are not), counted in `skipped`; false: stop, naming them")
    share_prompts: bool = option(True, "log-prob passes run each prompt once and share its KV with its n samples "
                                       "(n_samples > 1; not under FSDP)")
    reuse_logprobs: bool = option(True, "on-policy updates (ppo_epochs 1, one minibatch, no KL in the reward) take "
                                        "the old log-probs from the update's own forward, skipping a pass")
    max_prompt_length: int = option(128, "prompt tokens kept (from the right)")

    def __post_init__(self):
        super().__post_init__()
        if self.lora_r and self.lora_dropout:
            raise ValueError(f"PPOConfig.lora_dropout = {self.lora_dropout}: the PPO family trains without dropout "
                             f"(its training forward must match the rollout's log-probs); set lora_dropout: 0")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"PPOConfig.algorithm must be one of {list(ALGORITHMS)}, found {self.algorithm!r}")
        if self.n_samples is None:
            self.n_samples = DEFAULT_N_SAMPLES[self.algorithm]
        if self.algorithm in ("grpo", "rloo") and self.n_samples < 2:
            raise ValueError(f"PPOConfig.n_samples must be >= 2 for {self.algorithm}, found {self.n_samples}")
        for name in ("iterations", "prompts_per_iteration", "n_samples", "max_new_tokens", "ppo_epochs",
                     "minibatch_size", "max_prompt_length", "max_sampling_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive int, found {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 (greedy has no gradient), found {self.temperature}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"PPOConfig.policy_loss must be one of {list(POLICY_LOSSES)}, found {self.policy_loss!r}")
        if self.agg is None:
            self.agg = "seq-mean-token-mean" if self.policy_loss in ("gspo", "sapo") else "token-mean"
        if self.agg not in AGG_MODES:
            raise ValueError(f"PPOConfig.agg must be one of {list(AGG_MODES)}, found {self.agg!r}")
        if self.agg_norm is not None and (self.agg != "seq-mean-token-sum-norm" or self.agg_norm <= 0):
            raise ValueError(f"PPOConfig.agg_norm must be > 0 and needs agg: seq-mean-token-sum-norm, found "
                             f"agg_norm={self.agg_norm}, agg={self.agg}")
        if self.agg == "seq-mean-token-sum-norm" and self.agg_norm is None:
            # a constant, as Dr. GRPO divides by: the batch's padded width differs between ranks and iterations
            self.agg_norm = float(self.max_new_tokens)
        if self.dual_clip is not None and self.policy_loss != "ppo":
            raise ValueError(f"PPOConfig.dual_clip applies to policy_loss: ppo only, found {self.policy_loss}")
        for name in ("sapo_tau_pos", "sapo_tau_neg", "rollout_correction_cap"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, found {getattr(self, name)}")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"PPOConfig.rollout_correction must be one of {list(ROLLOUT_CORRECTIONS)}, found "
                             f"{self.rollout_correction!r}")
        if self.rollout_correction_low is not None and not (
                0 < self.rollout_correction_low < self.rollout_correction_cap):
            raise ValueError(f"PPOConfig.rollout_correction_low must lie in (0, rollout_correction_cap = "
                             f"{self.rollout_correction_cap}), found {self.rollout_correction_low}")
        if isinstance(self.overlong_buffer, bool) or not isinstance(self.overlong_buffer, int) or not (
                0 <= self.overlong_buffer < self.max_new_tokens):
            raise ValueError(f"PPOConfig.overlong_buffer must be an int in [0, max_new_tokens = "
                             f"{self.max_new_tokens}), found {self.overlong_buffer!r}")
        if self.overlong_penalty < 0:
            raise ValueError(f"PPOConfig.overlong_penalty must be >= 0, found {self.overlong_penalty}")
        if self.dynamic_sampling and self.algorithm not in ("grpo", "rloo"):
            raise ValueError("PPOConfig.dynamic_sampling needs groups: algorithm grpo or rloo (n_samples >= 2)")
        if self.reward_model and self.reward_fn:
            raise ValueError("PPOConfig: set one of reward_model or reward_fn, not both")

    RENAMED_KEYS = {**RunConfig.RENAMED_KEYS,
                    "tis_cap": "rollout_correction: tis with rollout_correction_cap: <the cap>"}

    def require(self, *names: str) -> None:
        super().require(*names)
        if not (self.reward_model or self.reward_fn):
            raise ValueError("PPOConfig: set reward_model (a directory from `rlhf-engine rm`) or reward_fn "
                             "('module:function')")


def _norm(value) -> float:
    """A gradient norm as a float (under FSDP it is a replicated DTensor)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


class PPOTrainer(ExperienceMaker):
    """Holds the policy (trained in place), the frozen reference, the critic (PPO) and the rollout engine."""

    def __init__(self, policy, tokenizer, config: PPOConfig, *, reward_model=None, reward_fn=None, critic=None,
                 reference=None, dist: DistInfo | None = None):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("PPOTrainer: pass exactly one of reward_model (a ScalarHeadModel) or reward_fn")
        self.config = config
        policy = unwrap_peft(policy)
        self.policy = policy
        self.tokenizer = tokenizer
        self.reward_model = reward_model
        # workers import the function by its spec when the config names it; else it is pickled to them
        self.scorer = None if reward_fn is None else RewardScorer(
            reward_fn, spec=config.reward_fn or None, workers=config.reward_workers, timeout=config.reward_timeout,
            on_error=config.reward_on_error)
        # the frozen reference is the policy as it starts (a resumed run passes the original model instead),
        # frozen, so held in the compute dtype (no fp32 master); with LoRA it is the policy with its adapters
        # disabled (None here): no second copy of the weights
        # an adapter trained before this run, with no reference given: checked by train() unless it resumes
        self._trained_adapters = reference is None and has_lora(policy) and trained_adapters(policy)
        self.lora = prepare_lora(policy, config)
        self.reference = reference
        if reference is None and not self.lora:
            self.reference = frozen_copy(policy, config.precision)
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        self.critic = None
        if config.algorithm == "ppo":
            if critic is None:
                # (a copy of an adapted policy keeps its adapters: the critic then trains its own copy of them)
                critic = ScalarHeadModel(copy.deepcopy(reward_model.lm if reward_model is not None else policy))
                if reward_model is not None:
                    critic.head.load_state_dict(reward_model.head.state_dict())
            prepare_lora(critic.lm, config)
        # the trained roots: FSDP-sharded or DDP-replicated under torchrun (the reference and reward model are
        # frozen and replicated); every training forward goes through these modules
        self.dist = dist or DistInfo()
        world = self.dist.world_size
        if config.prompts_per_iteration % world or config.minibatch_size % world:
            raise ValueError(f"PPOConfig.prompts_per_iteration ({config.prompts_per_iteration}) and minibatch_size "
                             f"({config.minibatch_size}) must be multiples of the world size {world}")
        mixed = fsdp_mixed_precision(config.precision)
        if config.gradient_checkpointing:  # after the reference copy: the frozen reference keeps its activations
            for lm in (policy, critic.lm) if critic is not None else (policy,):
                enable_gradient_checkpointing(lm)
        self.policy_module = wrap(CausalLMLogprobs(policy), self.dist, mixed_precision=mixed)
        self.critic_module = None
        if critic is not None:
            self.critic = critic
            self.critic_module = wrap(critic, self.dist, mixed_precision=mixed)
            self.critic_optimizer = torch.optim.AdamW(
                [p for p in self.critic_module.parameters() if p.requires_grad], lr=config.critic_lr)
        self.optimizer = torch.optim.AdamW([p for p in self.policy_module.parameters() if p.requires_grad],
                                           lr=config.lr)
        self.device = next(policy.parameters()).device
        self.scaler, self.critic_scaler = LossScaler(config.precision), LossScaler(config.precision)
        # the rollout reads compute-dtype weights: FSDP's gathered parameters, else a shadow copy of the policy
        self.rollout_weights = RolloutWeights(policy, config.precision, shadow=self.dist.strategy != "fsdp")
        self.engine = RolloutEngine(self.rollout_weights.model)
        self.kl_reward_coef = config.kl_reward_coef
        self.rng = random.Random(config.seed)
        self.iteration = 0
        self.last_rollout: dict = {}  # prompts, responses and scores of the latest iteration
        self._prompt_source: list = []  # the run's prompts (train sets them): dynamic sampling draws more from them

    # ------------------------------------------------------------------------------------------------------------
    def _global_scale(self, mask: torch.Tensor, agg: str) -> float:
        """Factor turning this rank's aggregated loss into its share of the global batch's (see distributed.py;
        the gradient reduction averages over ranks): local count * world / global count, with count = tokens
        (token-mean) or counted sequences (seq-mean-token-sum, seq-mean-token-mean); token-sum adds up over ranks
        (world); seq-mean-token-sum-norm divides by every rank's equal number of rows already (1)."""
        if not self.dist.enabled or agg == "seq-mean-token-sum-norm":
            return 1.0
        if agg == "token-sum":
            return float(self.dist.world_size)
        local = float(mask.sum()) if agg == "token-mean" else float((mask.sum(-1) > 0).sum())
        (total,) = self.dist.all_reduce([local])
        return local * self.dist.world_size / max(total, 1.0)

    def _reduce(self, stats: dict) -> dict:
        """Means over ranks (every rank holds the same number of samples), sums for rates, max for maxima."""
        if not self.dist.enabled:
            return stats
        maxima = {k: v for k, v in stats.items() if k.endswith("_max")}  # a max over ranks, not a mean
        out = self.dist.reduce_stats({k: v for k, v in stats.items() if k not in maxima}, maxima)
        world = self.dist.world_size
        sums = ("tokens_per_s", "reward_errors")
        return {k: v if k in sums or k in maxima else v / world for k, v in out.items()}

    @with_config_tf32
    def update(self, batch: dict) -> dict:
        """``ppo_epochs`` passes of minibatches over the policy loss (and the critic's value loss)."""
        if not self.config.gradient_checkpointing:
            return self._update(batch)
        with checkpoint_in_eval_mode(*((self.policy, self.critic.lm) if self.critic is not None else (self.policy,))):
            return self._update(batch)

    def _update(self, batch: dict) -> dict:
        cfg = self.config
        b = batch["input_ids"].shape[0]
        minibatch = cfg.minibatch_size // self.dist.world_size  # this rank's share of each global minibatch
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            # on the CPU whatever torch's default device: the generator is a CPU one
            order = torch.randperm(b, generator=torch.Generator().manual_seed(self.rng.randrange(2**31)), device="cpu")
            whole = minibatch >= b
            if whole:  # one minibatch: keep the rollout's order, so each prompt's group of samples stays together
                order = torch.arange(b, device="cpu")
            for start in range(0, b, minibatch):
                idx = order[start : start + minibatch].to(batch["input_ids"].device)
                mb = {k: v[idx] for k, v in batch.items()}
                loss_mask = mb.get("loss_mask", mb["mask"])  # a batch built by hand may have only mask
                logp, entropy = self._logprobs(self.policy_module, mb["input_ids"], mb["attention_mask"],
                                               mb["targets"], entropy=True,
                                               prompt_len=mb.get("prompt_len") if whole else None)
                advantages = mb["advantages"]
                old_logp = mb.get("old_logp")
                mismatch = None
                if old_logp is None:  # on-policy (see rollout): the training forward is the old policy
                    old_logp = logp.detach()
                    mismatch = ((old_logp - mb["rollout_logp"]).abs() * mb["mask"]).max().item()
                # the rollout engine's sampling policy against the trained one (rollout_correction)
                is_weights, loss_mask, correction = rollout_correction(
                    old_logp, mb["rollout_logp"], loss_mask, cfg.rollout_correction, cap=cfg.rollout_correction_cap,
                    low=cfg.rollout_correction_low)
                scale = self._global_scale(loss_mask, cfg.agg)
                loss, stats = ppo_policy_loss(
                    logp, old_logp, advantages, loss_mask, policy_loss=cfg.policy_loss, clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, ref_logp=mb["ref_logp"] if cfg.kl_coef else None,
                    kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, rollout_is_weights=is_weights, agg=cfg.agg,
                    agg_norm=cfg.agg_norm, sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg,
                )
                if not cfg.entropy_coef:  # logged only: no gradient, so the backward skips the entropy term
                    entropy = entropy.detach()
                entropy_mean = masked_mean(entropy, loss_mask)
                # the entropy bonus is a token mean over the tokens in the loss, scaled as one under torchrun
                entropy_scale = scale if cfg.agg == "token-mean" or not cfg.entropy_coef else self._global_scale(
                    loss_mask, "token-mean")
                self.optimizer.zero_grad(set_to_none=True)
                # even when not finite: every rank must join the gradient reduction
                total = loss * scale - cfg.entropy_coef * entropy_scale * entropy_mean
                (total * self.scaler.scale).backward()
                self.scaler.unscale_(self.optimizer.param_groups[0]["params"])
                grad_norm = _norm(torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"],
                                                                 cfg.max_grad_norm))
                (bad_loss,) = self.dist.all_reduce([float(not bool(torch.isfinite(total)))])
                overflow = self.scaler.update(not bad_loss and math.isfinite(grad_norm))
                if overflow:  # fp16: the scale was halved; the minibatch is skipped, which is no failure
                    self.optimizer.zero_grad(set_to_none=True)
                    sums["skipped"] = sums.get("skipped", 0.0) + 1
                    continue
                if bad_loss or not math.isfinite(grad_norm):
                    quantity = "policy loss" if bad_loss else "policy gradient norm"
                    if not cfg.skip_nonfinite:
                        raise FloatingPointError(f"iteration {self.iteration}: the {quantity} is not finite; lower "
                                                 f"lr, check the reward, or set skip_nonfinite: true")
                    self.optimizer.zero_grad(set_to_none=True)
                    sums["skipped"] = sums.get("skipped", 0.0) + 1
                    continue
                self.optimizer.step()
                row = {"policy_loss": loss.item(), "entropy": entropy_mean.item(), "grad_norm": float(grad_norm)}
                row.update({k: float(v) for k, v in stats.items()})
                row.update(correction)
                if mismatch is not None:
                    row["logprob_mismatch_max"] = mismatch
                if self.critic_module is not None:
                    with self._autocast():
                        values = self.critic_module(mb["input_ids"], mb["attention_mask"])[:, :-1]
                    vloss, vstats = value_loss(values, mb["values"], mb["returns"], mb["mask"], clip=cfg.vf_clip)
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    (vloss * (self._global_scale(mb["mask"], "token-mean") * self.critic_scaler.scale)).backward()
                    critic_params = self.critic_optimizer.param_groups[0]["params"]
                    self.critic_scaler.unscale_(critic_params)
                    critic_norm = _norm(torch.nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm))
                    critic_finite = math.isfinite(critic_norm)
                    self.critic_scaler.update(critic_finite)  # fp16: an overflow halves the scale
                    if critic_finite:
                        self.critic_optimizer.step()
                    row.update(value_loss=vloss.item(), vf_clipfrac=float(vstats["clipfrac"]))
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        skipped = sums.pop("skipped", 0.0)
        out = self._reduce({k: v / count for k, v in sums.items()}) if count else {}
        return {**out, "skipped": skipped}

    @with_config_tf32
    def step(self, prompts: list) -> dict:
        """One iteration on ``prompts`` (strings, or PromptRecords / dicts whose other fields reach reward_fn)."""
        t0 = time.perf_counter()
        result = self.rollout(prompts)
        self.last_rollout = {k: result[k] for k in ("prompts", "responses", "scores")}
        t1 = time.perf_counter()
        if result["skip"]:  # a non-finite reward with skip_nonfinite: no update this iteration
            metrics = {"iteration": self.iteration, **result["stats"], "skipped": 1.0, "skipped_iteration": 1.0}
        else:
            metrics = {"iteration": self.iteration, **result["stats"], **self.update(result["batch"])}
        metrics["train_seconds"] = time.perf_counter() - t1
        metrics["seconds"] = time.perf_counter() - t0
        if self.config.adaptive_kl_target is not None and self.config.kl_in_reward and "kl_reward" in metrics:
            # proportional controller (Ziegler et al.): move the coefficient towards the target KL
            error = max(-0.2, min(0.2, metrics["kl_reward"] / self.config.adaptive_kl_target - 1.0))
            self.kl_reward_coef *= 1.0 + 0.1 * error
        metrics["kl_reward_coef"] = self.kl_reward_coef
        self.iteration += 1
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value) and not metrics.get("skipped"):
                raise FloatingPointError(f"iteration {metrics['iteration']}: {key} is not finite")
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """``(models, trainer_state)``: full (unsharded) state dicts keyed by name, so a checkpoint loads at any
        world size; a collective call under torchrun."""
        policy_state, optim_state = full_state(self.policy_module, self.optimizer)
        models = {"policy": SavesState(self.policy_module, policy_state)}
        state = {"optimizer": optim_state, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
                 "iteration": self.iteration, "kl_reward_coef": self.kl_reward_coef,
                 "loss_scale": [self.scaler.state_dict(), self.critic_scaler.state_dict()]}
        if self.critic_module is not None:
            critic_state, state["critic_optimizer"] = full_state(self.critic_module, self.critic_optimizer)
            models["critic"] = SavesState(self.critic_module, critic_state)
        return models, state

    def load_state_dict(self, state: dict) -> None:
        """Optimizers, RNG, iteration and KL coefficient (the weights were loaded into the models already)."""
        load_optimizer_state(self.policy_module, self.optimizer, state["optimizer"])
        if self.critic_module is not None:
            load_optimizer_state(self.critic_module, self.critic_optimizer, state["critic_optimizer"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = state["iteration"]
        self.kl_reward_coef = state["kl_reward_coef"]
        for scaler, scaler_state in zip((self.scaler, self.critic_scaler), state.get("loss_scale", [None, None]),
                                        strict=True):
            scaler.load_state_dict(scaler_state)
        self.engine.reset_prefix_cache()

    def save(self) -> str | None:
        models, state = self.state_dict()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.config.output_dir, self.iteration, models=models, state=state,
                                   meta={"phase": self.config.algorithm, "world_size": self.dist.world_size},
                                   keep=self.config.save_total_limit, tokenizer=self.tokenizer)
        self.dist.barrier()
        return path

    @with_config_tf32
    def train(self, prompts: list[str], *, progress: bool = True, on_step=None,
              resume_from: str | None = None) -> list[dict]:
        """Runs to ``config.iterations``; with ``config.output_dir`` writes metrics.jsonl and checkpoints there.

        ``resume_from`` (a checkpoint directory whose models were already loaded into this trainer's policy and
        critic) restores the optimizer, RNG and iteration state so the run continues exactly where it stopped.
        """
        if not prompts:
            raise ValueError("PPOTrainer.train: prompts is empty")
        if self._trained_adapters and resume_from is None:
            raise ValueError(TRAINED_ADAPTERS_ERROR.format(who="PPOTrainer"))
        prompts = as_records(prompts, "prompts", "prompts")
        self._prompt_source = prompts
        from rlhf_engine.progress import progress_bar

        cfg = self.config
        if resume_from is not None:
            self.load_state_dict(load_checkpoint_state(resume_from)[1])
        logger = open_metrics(cfg, self.dist, self.iteration if resume_from else None)
        history = []
        bar = progress_bar(cfg.iterations, initial=self.iteration, desc=cfg.algorithm,
                           enabled=progress and self.dist.is_main)
        end = min(cfg.iterations, self.iteration + cfg.stop_after_steps) if cfg.stop_after_steps else cfg.iterations
        try:
            while self.iteration < end:
                chosen = [self.rng.choice(prompts) for _ in range(cfg.prompts_per_iteration)]
                metrics = self.step(chosen)
                metrics["step"] = metrics["iteration"]
                if on_step is not None:
                    on_step(metrics)
                history.append(metrics)
                if logger is not None:
                    logger.log(metrics)
                bar.update(1)
                # (an iteration dynamic sampling skipped has no reward or KL)
                bar.set_postfix(reward=f"{metrics.get('reward_mean', math.nan):.3f}",
                                kl=f"{metrics.get('kl', math.nan):.3f}")
                last = self.iteration == end
                if cfg.output_dir and ((cfg.save_every and self.iteration % cfg.save_every == 0) or last):
                    self.save()
        finally:
            bar.close()
            if logger is not None:
                logger.close()
            self.close()
        return history

    def close(self) -> None:
        """Ends the reward workers, if any (``train`` does it when it returns; a later step starts new ones)."""
        if self.scorer is not None:
            self.scorer.close()
