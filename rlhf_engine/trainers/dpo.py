"""Direct preference optimisation on the preference JSONL (Rafailov et al. 2023), offline, beside PPO.

    rlhf-engine dpo --config dpo.yaml                                 # the CLI

    from rlhf_engine.trainers.dpo import DPOConfig, train_dpo
    history = train_dpo(policy, tokenizer, pairs, DPOConfig(beta=0.1))   # reference: a frozen copy of policy
    history = train_dpo(policy, tokenizer, pairs, DPOConfig(lora_r=16))   # reference: policy, adapters disabled

With sequence log-probs summed over response tokens, pi = log pi(y|x), ref = log pi_ref(y|x), and
h = (pi_c - ref_c) - (pi_r - ref_r):
    sigmoid  -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)   (eps = label_smoothing; 0 is plain DPO)
    ipo      (h - 1 / (2 beta))^2                                       (Azar et al. 2023; log-probs averaged
                                                                         over tokens rather than summed)
Both go through ``linear_logprobs``: the [2B, T, V] logits of chosen and rejected never exist.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_engine.data.jsonl import as_records
from rlhf_engine.data.sft import IGNORE_INDEX, SFTBatch
from rlhf_engine.distributed import DistInfo
from rlhf_engine.models.heads import CausalLMLogprobs
from rlhf_engine.models.loading import prepare_lora
from rlhf_engine.models.lora import TRAINED_ADAPTERS_ERROR, as_reference, has_lora, trained_adapters, unwrap_peft
from rlhf_engine.precision import autocast, frozen_copy
from rlhf_engine.trainers.common import TrainConfig, Trainer, move, option
from rlhf_engine.trainers.reward import pair_batch

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(TrainConfig):
    lr: float = option(1e-6, "peak learning rate (AdamW)")
    batch_size: int = option(16, "preference pairs per micro-batch")
    beta: float = option(0.1, "strength of the implicit KL constraint to the reference")
    loss_type: str = option("sigmoid", "sigmoid (DPO; with label_smoothing, cDPO) | ipo")
    label_smoothing: float = option(0.0, "sigmoid: the assumed probability that a label is flipped, in [0, 0.5)")
    ref_model: str = option("", "reference model directory (default: a frozen copy of `model` at step 0)")

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"DPOConfig.loss_type must be one of {list(DPO_LOSSES)}, found {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, found {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), found {self.label_smoothing!r}")


def sequence_logprobs(module, batch: SFTBatch, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of the response tokens' log-probs of each row [B], fp32; ``module`` as in ``sft_loss``."""
    if hasattr(module, "get_output_embeddings"):
        module = CausalLMLogprobs(module)
    targets = batch.labels[:, 1:]
    total = module(batch.input_ids, batch.attention_mask, targets).sum(-1)
    return total / (targets != IGNORE_INDEX).sum(-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss [B] from sequence log-probs [B] (see the module docstring)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {list(DPO_LOSSES)}, found {loss_type!r}")


def _dpo_sums(policy, reference, batch: SFTBatch, config: DPOConfig, lm=None) -> dict:
    """``reference`` None: the reference is ``policy`` with the adapters of its LM ``lm`` disabled (LoRA)."""
    average = config.loss_type == "ipo"
    with torch.no_grad(), contextlib.nullcontext() if reference is not None else as_reference(lm):
        ref_c, ref_r = sequence_logprobs(reference if reference is not None else policy, batch,
                                         average=average).chunk(2)
    pol_c, pol_r = sequence_logprobs(policy, batch, average=average).chunk(2)
    losses = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=config.beta, loss_type=config.loss_type,
                      label_smoothing=config.label_smoothing)
    reward_c, reward_r = config.beta * (pol_c - ref_c).detach(), config.beta * (pol_r - ref_r).detach()
    return {"loss": losses.sum(), "accuracy": (reward_c > reward_r).float().sum(), "reward_chosen": reward_c.sum(),
            "reward_rejected": reward_r.sum(), "reward_margin": (reward_c - reward_r).sum(),
            "logp_chosen": pol_c.detach().sum(), "logp_rejected": pol_r.detach().sum()}


def train_dpo(policy, tokenizer, pairs, config: DPOConfig, *, reference=None, progress: bool = True, on_step=None,
              eval_pairs=None, resume_from: str | None = None, dist: DistInfo | None = None) -> list[dict]:
    """Trains ``policy`` in place on preference pairs; ``reference`` (replicated on every rank, frozen) defaults
    to a frozen copy of the policy as it starts."""
    if not pairs:
        raise ValueError("train_dpo: pairs is empty")
    pairs = as_records(pairs, "preferences", "pairs")
    eval_pairs = as_records(eval_pairs, "preferences", "eval_pairs") if eval_pairs else None
    policy = unwrap_peft(policy)
    device = next(policy.parameters()).device
    # LoRA: the reference is the policy with its adapters disabled, no second copy of the weights
    if reference is None and resume_from is None and has_lora(policy) and trained_adapters(policy):
        raise ValueError(TRAINED_ADAPTERS_ERROR.format(who="train_dpo"))
    if reference is None and not prepare_lora(policy, config):
        reference = frozen_copy(policy, config.precision)  # frozen: held in the compute dtype, no fp32 master
    if reference is not None:
        reference.eval().requires_grad_(False)

    def collate(chunk):
        return move(pair_batch(tokenizer, chunk, config.max_length)[0], device)

    trainer = Trainer(config, "dpo", CausalLMLogprobs(policy), tokenizer=tokenizer, dist=dist, progress=progress)
    evaluate = None
    if eval_pairs:
        evaluate = lambda: evaluate_dpo(trainer.module, reference, tokenizer, eval_pairs, config, lm=policy)  # noqa: E731
    policy.train()
    return trainer.fit(lambda rng: rng.sample(pairs, min(config.batch_size, len(pairs))), collate,
                       lambda b: _dpo_sums(trainer.module, reference, b, config, policy),
                       lambda b: b.input_ids.shape[0] // 2,
                       evaluate=evaluate, resume_from=resume_from, on_step=on_step, weight_name="pairs")


@torch.no_grad()
def evaluate_dpo(policy, reference, tokenizer, pairs, config: DPOConfig, lm=None) -> dict:
    """Held-out DPO loss, implicit-reward accuracy and margin (``reference`` None: ``lm``'s adapters disabled)."""
    pairs = as_records(pairs, "preferences", "pairs")
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    sums: dict[str, float] = {}
    for start in range(0, len(pairs), config.batch_size):
        batch, _ = pair_batch(tokenizer, pairs[start : start + config.batch_size], config.max_length)
        with autocast(config.precision, device):
            out = _dpo_sums(policy, reference, move(batch, device), config, lm)
        for key in ("loss", "accuracy", "reward_margin"):
            sums[key] = sums.get(key, 0.0) + float(out[key])
    policy.train(was_training)
    return {k: v / max(1, len(pairs)) for k, v in sums.items()}
