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
from rlhf_engine.distributed import DistInfo, SavesState, full_state, gathered, load_optimizer_state, wrap
from rlhf_engine.models.heads import CausalLMLogprobs, ScalarHeadModel, position_ids_for
from rlhf_engine.models.loading import max_positions
from rlhf_engine.ops import (
    AGG_MODES,
    POLICY_LOSSES,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    reinforce_pp_returns,
    value_loss,
)
from rlhf_engine.precision import LossScaler, RolloutWeights, autocast, frozen_copy, fsdp_mixed_precision
from rlhf_engine.rewards.scoring import RewardScorer
from rlhf_engine.rollout import RolloutEngine, SamplingParams
from rlhf_engine.trainers.common import RunConfig, open_metrics, option
from rlhf_engine.trainers.experience import ROLLOUT_CORRECTIONS, overlong_penalty, rollout_correction

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce++", "remax")
KL_IN_REWARD = ("ppo", "reinforce++")  # the algorithms whose reward carries the KL (kl_in_reward)


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
    agg_norm: float | None = option(None, "seq-mean-token-sum-norm: divide by this fixed length instead of the "
                                          "batch's padded width (Dr. GRPO: max_new_tokens)")
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


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


class PPOTrainer:
    """Holds the policy (trained in place), the frozen reference, the critic (PPO) and the rollout engine."""

    def __init__(self, policy, tokenizer, config: PPOConfig, *, reward_model=None, reward_fn=None, critic=None,
                 reference=None, dist: DistInfo | None = None):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("PPOTrainer: pass exactly one of reward_model (a ScalarHeadModel) or reward_fn")
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer
        self.reward_model = reward_model
        # workers import the function by its spec when the config names it; else it is pickled to them
        self.scorer = None if reward_fn is None else RewardScorer(
            reward_fn, spec=config.reward_fn or None, workers=config.reward_workers, timeout=config.reward_timeout,
            on_error=config.reward_on_error)
        # the frozen reference is the policy as it starts (a resumed run passes the original model instead)
        # (frozen, so held in the compute dtype: no fp32 master)
        self.reference = (reference if reference is not None else frozen_copy(policy, config.precision))
        self.reference.eval().requires_grad_(False)
        self.critic = None
        if config.algorithm == "ppo":
            if critic is None:
                critic = ScalarHeadModel(copy.deepcopy(reward_model.lm if reward_model is not None else policy))
                if reward_model is not None:
                    critic.head.load_state_dict(reward_model.head.state_dict())
        # the trained roots: FSDP-sharded or DDP-replicated under torchrun (the reference and reward model are
        # frozen and replicated); every training forward goes through these modules
        self.dist = dist or DistInfo()
        world = self.dist.world_size
        if config.prompts_per_iteration % world or config.minibatch_size % world:
            raise ValueError(f"PPOConfig.prompts_per_iteration ({config.prompts_per_iteration}) and minibatch_size "
                             f"({config.minibatch_size}) must be multiples of the world size {world}")
        mixed = fsdp_mixed_precision(config.precision)
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
    def _encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)[-(self.config.max_prompt_length - 1) :]
        return ([self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []) + ids

    def _logprobs(self, module, input_ids, attention_mask, targets, *, entropy=False, prompt_len=None):
        """log-probs (and entropy) of ``targets`` [B, L-1] under ``module`` (a CausalLMLogprobs, possibly
        wrapped, or a plain causal LM) at the sampling temperature. ``prompt_len`` [B] (rows in groups of
        n_samples sharing a prompt, as the rollout lays them out) lets each prompt run once for its group."""
        if hasattr(module, "get_output_embeddings"):
            module = CausalLMLogprobs(module)
        n = self.config.n_samples
        shared = None
        # NOTE: not under FSDP: the shared path runs the body twice in one forward, untested with FSDP2's hooks
        if prompt_len is not None and self.config.share_prompts and n > 1 and self.dist.strategy != "fsdp":
            shared = (n, prompt_len[::n].tolist())
        with self._autocast():
            return module(input_ids, attention_mask, targets, position_ids=position_ids_for(attention_mask),
                          temperature=self.config.temperature, return_entropy=entropy, shared_prompts=shared)

    def _autocast(self):
        return autocast(self.config.precision, self.device)

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``masked_whiten`` over the global batch: mean and (unbiased) variance from every rank's tokens."""
        if not self.dist.enabled:
            return masked_whiten(values, mask)
        m = mask.float()
        total, count = self.dist.all_reduce([float((values * m).sum()), float(m.sum())])
        mean = total / max(count, 1.0)
        (sq,) = self.dist.all_reduce([float((((values - mean) ** 2) * m).sum())])
        var = sq / max(count - 1.0, 1.0)
        return torch.where(m != 0, (values - mean) * (var + 1e-8) ** -0.5, 0.0)

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

    def _model_scores(self, sequences: list[list[int]]) -> torch.Tensor:
        """The reward model's score of each sample on ``sequences``, the tokens the policy saw (its prompt cut to
        max_prompt_length, then the response), ending in EOS as in its training."""
        from rlhf_engine.trainers.reward import score_ids

        eos = self.tokenizer.eos_token_id
        sequences = [s if eos is None or s[-1] == eos else s + [eos] for s in sequences]
        limit = max_positions(self.reward_model)
        longest = max(len(s) for s in sequences)
        if limit is not None and longest > limit:
            raise ValueError(f"a sample of {longest} tokens (prompt cut to max_prompt_length, response of at most "
                             f"max_new_tokens, EOS) is longer than the reward model's max_position_embeddings = "
                             f"{limit}: lower PPOConfig.max_prompt_length or max_new_tokens")
        with self._autocast():
            return score_ids(self.reward_model, sequences, self.tokenizer.pad_token_id).cpu()

    def _generate(self, records: list, *, greedy: bool = False) -> list:
        """The n samples of each record's prompt (``RolloutOutput`` per record; ``greedy``: one greedy response
        each); no prompts, no samples (a rank with nothing to sample still joins FSDP's gather, a collective)."""
        cfg = self.config
        eos = self.tokenizer.eos_token_id
        params = SamplingParams(n=1 if greedy else cfg.n_samples, temperature=0.0 if greedy else cfg.temperature,
                                top_p=1.0 if greedy else cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop_token_ids=(eos,) if eos is not None else (),
                                seed=self.rng.randrange(2**31))
        self.rollout_weights.refresh()  # a copy only when an optimizer step moved the master weights
        with gathered(self.policy_module):  # FSDP: whole parameters for the rollout, freed after
            if not records:
                return []
            return self.engine.generate([self._encode_prompt(r.prompt) for r in records], params)

    def _score_groups(self, groups: list) -> tuple[torch.Tensor, int, dict]:
        """(scores [samples], reward errors, reward_fn extras) of ``groups`` [(record, RolloutOutput)]."""
        eos = self.tokenizer.eos_token_id
        samples = [(record, out, s) for record, out in groups for s in out.samples]
        if self.scorer is None:
            return self._model_scores([out.prompt_token_ids + s.token_ids for _, out, s in samples]), 0, {}
        responses = [self.tokenizer.decode([t for t in s.token_ids if t != eos], skip_special_tokens=True)
                     for _, _, s in samples]
        return self.scorer.submit([r.prompt for r, _, _ in samples], responses,
                                  [r.fields for r, _, _ in samples]).result()

    def _sample_informative_groups(self, records: list, prompts: list) -> tuple[list, tuple | None, dict]:
        """DAPO's dynamic sampling: groups whose n rewards are all equal carry no group advantage and are dropped;
        fresh prompts (drawn from the run's prompts like the iteration's own) are sampled until this rank holds
        as many groups as it was given, or ``max_sampling_rounds`` rounds have run. Every rank runs the same
        rounds and keeps the same number of groups (the least any rank found), so the update's collectives
        match. Returns (groups, (scores, errors, extras) of the kept samples, logged numbers)."""
        cfg, n = self.config, self.config.n_samples
        quota = len(records)
        source = self._prompt_source or as_records(prompts, "prompts", "prompts")
        kept, kept_scores, dropped, errors, extras, rounds, scored_rounds = [], [], 0, 0, {}, 0, 0
        pool = records
        while True:
            rounds += 1
            groups = list(zip(pool, self._generate(pool), strict=True))
            if groups:
                scores, round_errors, round_extras = self._score_groups(groups)
                errors += round_errors
                scored_rounds += 1
                extras = {k: extras.get(k, 0.0) + v for k, v in round_extras.items()}
                for g, group in enumerate(groups):
                    if len(kept) == quota:
                        break
                    group_scores = scores[g * n : (g + 1) * n]
                    if bool((group_scores == group_scores[0]).all()):
                        dropped += 1
                    else:
                        kept.append(group)
                        kept_scores.append(group_scores)
            (missing,) = self.dist.all_reduce([float(quota - len(kept))])
            if missing == 0 or rounds >= cfg.max_sampling_rounds:
                break
            # every rank draws the same global prompts (the RNG stays in step) and samples its share if it needs any
            draw = [self.rng.choice(source) for _ in range(cfg.prompts_per_iteration)]
            pool = self.dist.shard(draw) if len(kept) < quota else []
        common = -self.dist.reduce_stats({}, {"fewest": -float(len(kept))})["fewest"]
        kept, kept_scores = kept[: int(common)], kept_scores[: int(common)]
        stats = {"sampling_rounds": float(rounds), "groups_kept": float(len(kept)), "groups_dropped": float(dropped)}
        if not kept:
            return [], None, stats
        extras = {k: v / scored_rounds for k, v in extras.items()}  # means over the rounds' batches
        return kept, (torch.cat(kept_scores), errors, extras), stats

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict:
        """Generates, scores and prepares one iteration's batch (everything the update needs)."""
        cfg = self.config
        t0 = time.perf_counter()
        records = self.dist.shard(as_records(prompts, "prompts", "prompts"))  # each rank its own prompts
        eos = self.tokenizer.eos_token_id
        if cfg.dynamic_sampling:
            groups, scored, sampling_stats = self._sample_informative_groups(records, prompts)
        else:
            groups, scored, sampling_stats = list(zip(records, self._generate(records), strict=True)), None, {}
        baseline = None
        if cfg.algorithm == "remax":  # ReMax (arXiv 2310.10505): the reward of a greedy response per prompt
            baseline, _, _ = self._score_groups(list(zip(records, self._generate(records, greedy=True), strict=True)))
            sampling_stats["baseline_reward_mean"] = baseline.float().mean().item()
        rollout_seconds = time.perf_counter() - t0
        if not groups:  # dynamic sampling found no group with a reward signal on some rank: nothing to learn from
            return {"batch": None, "stats": self._reduce(sampling_stats), "responses": [], "prompts": [],
                    "scores": torch.zeros(0), "skip": True}
        rows, texts_p, texts_r, fields = [], [], [], []
        for record, out in groups:
            for s in out.samples:
                rows.append((out.prompt_token_ids, s))
                texts_p.append(record.prompt)
                fields.append(record.fields)
                texts_r.append(self.tokenizer.decode([t for t in s.token_ids if t != eos], skip_special_tokens=True))
        # with reward workers the scores are computed while the log-prob passes below run
        pending = self.scorer.submit(texts_p, texts_r, fields) if self.scorer is not None and scored is None else None
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
        truncated = torch.tensor([s.finish_reason == "length" for _, s in rows])
        response_lengths = torch.tensor([len(s.token_ids) for _, s in rows])
        device = next(self.policy.parameters()).device
        input_ids, attention_mask, targets = input_ids.to(device), attention_mask.to(device), targets.to(device)
        # NOTE: an on-policy update (one epoch, one minibatch) has old = detached current log-probs (ratio 1), so
        # its own forward gives them; the KL in the reward, though, needs them before the update.
        on_policy = (cfg.reuse_logprobs and cfg.ppo_epochs == 1
                     and not (cfg.algorithm in KL_IN_REWARD and cfg.kl_in_reward)
                     and cfg.prompts_per_iteration * cfg.n_samples <= cfg.minibatch_size)
        prompt_len = torch.tensor([len(p) for p, _ in rows], device=device)
        old_logp = None if on_policy else self._logprobs(self.policy_module, input_ids, attention_mask, targets,
                                                         prompt_len=prompt_len)
        ref_logp = self._logprobs(self.reference, input_ids, attention_mask, targets, prompt_len=prompt_len)
        if scored is not None:  # dynamic sampling scored the groups already
            scores, reward_errors, reward_extras = scored
        elif pending is not None:
            scores, reward_errors, reward_extras = pending.result()
        else:
            scores, reward_errors, reward_extras = self._model_scores([p + s.token_ids for p, s in rows]), 0, {}
        scores = scores.to(device)
        (bad_rewards,) = self.dist.all_reduce([float(not bool(torch.isfinite(scores).all()))])
        if bad_rewards:
            if not cfg.skip_nonfinite:
                raise FloatingPointError(f"iteration {self.iteration}: a reward is not finite (NaN or inf from the "
                                         f"reward model or reward_fn); fix the reward, or set skip_nonfinite: true")
            scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)  # the update is skipped anyway
        raw_scores = scores
        if cfg.overlong_buffer:  # DAPO: a soft punishment inside the last overlong_buffer tokens
            scores = scores + overlong_penalty(response_lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                               cfg.overlong_penalty).to(device)
        mask, rollout_logp, last = mask.to(device), rollout_logp.to(device), last.to(device)
        truncated = truncated.to(device)
        sample_logp = rollout_logp if on_policy else old_logp
        kl = kl_penalty(sample_logp, ref_logp, cfg.kl_reward_kind) * mask
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, targets=targets, mask=mask,
                     ref_logp=ref_logp, rollout_logp=rollout_logp, prompt_len=prompt_len,
                     # the policy loss's mask: mask_truncated drops completions cut at max_new_tokens
                     loss_mask=mask & ~truncated[:, None] if cfg.mask_truncated else mask)
        if not on_policy:
            batch["old_logp"] = old_logp
        if cfg.algorithm == "ppo":
            with self._autocast():
                values = self.critic_module(input_ids, attention_mask)[:, :-1] * mask
            rewards = torch.zeros_like(ref_logp)
            rewards[torch.arange(b, device=device), last] = scores
            if cfg.kl_in_reward:
                rewards = rewards - self.kl_reward_coef * kl
            advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            batch.update(values=values, returns=returns)
            # how much of the returns' variance the critic explains (1 perfect, 0 a constant guess, < 0 worse)
            unexplained = masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
            explained_variance = 1.0 - float(unexplained)
        elif cfg.algorithm == "reinforce++":  # G_t = r_t + gamma G_{t+1} of the KL-shaped token rewards
            rewards = torch.zeros_like(ref_logp)
            rewards[torch.arange(b, device=device), last] = scores
            if cfg.kl_in_reward:
                rewards = rewards - self.kl_reward_coef * kl
            advantages = reinforce_pp_returns(rewards, mask, cfg.gamma, whiten=False)  # whitened below, globally
        elif cfg.algorithm == "remax":  # each sample's reward minus its prompt's greedy sample's
            advantages = (scores - baseline.to(device).repeat_interleave(cfg.n_samples))[:, None] * mask
        else:
            group = group_advantages(scores, cfg.n_samples, kind=cfg.algorithm)
            advantages = group[:, None].expand_as(ref_logp) * mask
        if cfg.whiten_advantages:
            advantages = self._whiten(advantages, mask)
        batch["advantages"] = advantages
        # logged KL: k3 (exp(r) - 1 - r with r = ref - logp, >= 0 token by token) summed per sequence; k1, the
        # reward's default estimator, is unbiased but a batch mean of it can be negative
        # (clamped at 0: exp(r) - 1 - r can round to -1e-8 for a tiny r in fp32)
        seq_kl_k3 = (kl_penalty(sample_logp, ref_logp, "k3").clamp(min=0) * mask).sum(-1).mean()
        stats = {
            "reward_mean": raw_scores.mean().item(),
            "reward_std": raw_scores.std().item() if b > 1 else 0.0,
            "kl": seq_kl_k3.item(),
            # kl_reward_kind per sequence: what the reward subtracts and the adaptive controller reads
            "kl_reward": kl.sum(-1).mean().item(),
            "response_length": mask.sum(-1).float().mean().item(),
            "truncated": truncated.float().mean().item(),  # share of samples cut at max_new_tokens
            "rollout_seconds": rollout_seconds,
            "tokens_per_s": self.engine.stats["decode_tokens"] / max(rollout_seconds, 1e-9),
        }
        if self.config.reward_on_error is not None:
            stats["reward_errors"] = float(reward_errors)  # samples scored reward_on_error
        if cfg.overlong_buffer:
            stats["overlong_penalty"] = (scores - raw_scores).mean().item()
        stats.update({f"reward/{k}": v for k, v in reward_extras.items()})  # a reward_fn's own logged numbers
        stats.update(sampling_stats)
        if not on_policy:  # else the update measures it on its own forward
            stats["logprob_mismatch_max"] = ((old_logp - rollout_logp).abs() * mask).max().item()
        if cfg.algorithm == "ppo":
            stats["explained_variance"] = explained_variance
        return {"batch": batch, "stats": self._reduce(stats), "responses": texts_r, "prompts": texts_p,
                "scores": scores, "skip": bool(bad_rewards)}

    def _reduce(self, stats: dict) -> dict:
        """Means over ranks (every rank holds the same number of samples), sums for rates, max for maxima."""
        if not self.dist.enabled:
            return stats
        maxima = {k: v for k, v in stats.items() if k.endswith("_max")}  # a max over ranks, not a mean
        out = self.dist.reduce_stats({k: v for k, v in stats.items() if k not in maxima}, maxima)
        world = self.dist.world_size
        sums = ("tokens_per_s", "reward_errors")
        return {k: v if k in sums or k in maxima else v / world for k, v in out.items()}

    def update(self, batch: dict) -> dict:
        """``ppo_epochs`` passes of minibatches over the policy loss (and the critic's value loss)."""
        cfg = self.config
        b = batch["input_ids"].shape[0]
        minibatch = cfg.minibatch_size // self.dist.world_size  # this rank's share of each global minibatch
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(b, generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
            whole = minibatch >= b
            if whole:  # one minibatch: keep the rollout's order, so each prompt's group of samples stays together
                order = torch.arange(b)
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
                entropy_mean = masked_mean(entropy, mb["mask"])
                total = loss - cfg.entropy_coef * entropy_mean
                self.optimizer.zero_grad(set_to_none=True)
                # even when not finite: every rank must join the gradient reduction
                (total * (scale * self.scaler.scale)).backward()
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
        if self.config.adaptive_kl_target is not None and self.config.kl_in_reward:
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

    def train(self, prompts: list[str], *, progress: bool = True, on_step=None,
              resume_from: str | None = None) -> list[dict]:
        """Runs to ``config.iterations``; with ``config.output_dir`` writes metrics.jsonl and checkpoints there.

        ``resume_from`` (a checkpoint directory whose models were already loaded into this trainer's policy and
        critic) restores the optimizer, RNG and iteration state so the run continues exactly where it stopped.
        """
        if not prompts:
            raise ValueError("PPOTrainer.train: prompts is empty")
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
