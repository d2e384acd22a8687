"""Reward-model training on preference pairs: a causal LM body plus a scalar head read at the last real token.

    rlhf-engine rm --config rm.yaml                                    # the CLI

    from rlhf_engine.trainers.reward import RewardConfig, train_reward_model
    history = train_reward_model(rm, tokenizer, pairs, RewardConfig(steps=200))      # rm: ScalarHeadModel

Losses: ``bt`` (Bradley-Terry) = -logsigmoid(r_chosen - r_rejected - margin), with each pair's ``margin`` field;
``margin-ranking`` = max(0, margin - (r_chosen - r_rejected)) (torch's MarginRankingLoss with y = 1), where the
margin is the pair's field or ``RewardConfig.margin``. Sequences are BOS + prompt + response + EOS, cut at
``max_length`` from the right (the prompt is kept whole; a prompt that leaves no room is an error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_engine.data.jsonl import as_records
from rlhf_engine.data.sft import SFTBatch, collate_sft, encode_sft
from rlhf_engine.distributed import DistInfo
from rlhf_engine.models.heads import last_token_index
from rlhf_engine.precision import autocast
from rlhf_engine.trainers.common import TrainConfig, Trainer, move, option

LOSSES = ("bt", "margin-ranking")


@dataclass
class RewardConfig(TrainConfig):
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    batch_size: int = option(16, "preference pairs per micro-batch")
    loss: str = option("bt", "bt (Bradley-Terry, -logsigmoid(r_c - r_r - margin)) | margin-ranking")
    margin: float = option(0.0, "margin-ranking: the margin for pairs without a margin field")

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"RewardConfig.loss must be one of {list(LOSSES)}, found {self.loss!r}")


def pair_batch(tokenizer, pairs, max_length: int) -> tuple[SFTBatch, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded, labels -100 on the prompt: (SFTBatch [2B, T], margins [B])."""
    encoded = [encode_sft(tokenizer, p.prompt, p.chosen, max_length) for p in pairs]
    encoded += [encode_sft(tokenizer, p.prompt, p.rejected, max_length) for p in pairs]
    margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return collate_sft(encoded, tokenizer.pad_token_id), margins


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor, kind: str,
                reduction: str = "mean") -> torch.Tensor:
    diff = chosen - rejected
    per_pair = -F.logsigmoid(diff - margins) if kind == "bt" else F.relu(margins - diff)
    return per_pair.mean() if reduction == "mean" else per_pair.sum()


def _pairs_loss(module, batch: SFTBatch, margins: torch.Tensor, kind: str) -> dict:
    scores = module(batch.input_ids, batch.attention_mask).gather(1, last_token_index(batch.attention_mask)[:, None])
    chosen, rejected = scores.squeeze(1).chunk(2)
    return {"loss": reward_loss(chosen, rejected, margins, kind, reduction="sum"),
            "accuracy": (chosen > rejected).float().sum().detach(),
            "reward_margin": (chosen - rejected).sum().detach()}


def train_reward_model(model, tokenizer, pairs, config: RewardConfig, *, progress: bool = True, on_step=None,
                       eval_pairs=None, resume_from: str | None = None, dist: DistInfo | None = None):
    """Trains ``model`` (a ScalarHeadModel) in place on ``pairs`` (PreferenceRecords or dicts as in the JSONL
    files); returns one metrics dict a step (loss, accuracy, margin)."""
    if not pairs:
        raise ValueError("train_reward_model: pairs is empty")
    pairs = as_records(pairs, "preferences", "pairs")
    eval_pairs = as_records(eval_pairs, "preferences", "eval_pairs") if eval_pairs else None
    device = next(model.parameters()).device
    if config.loss == "margin-ranking":
        pairs = [p if p.margin else type(p)(p.prompt, p.chosen, p.rejected, config.margin) for p in pairs]
    for p in pairs[:1]:  # a prompt that cannot fit is reported before training starts
        encode_sft(tokenizer, p.prompt, p.chosen, config.max_length)

    def collate(chunk):
        batch, margins = pair_batch(tokenizer, chunk, config.max_length)
        return move(batch, device), margins.to(device)

    # NOTE: both losses see only r_chosen - r_rejected, in which the head's bias cancels: its gradient is exactly 0
    # in exact arithmetic, and Adam (lr * g / (|g| + eps)) would turn rounding noise into steps of up to lr, a
    # random walk of the bias. It stays as initialised (or loaded) while the reward model trains.
    bias = model.head.bias
    bias_trainable = bias is not None and bias.requires_grad
    if bias_trainable:
        bias.requires_grad_(False)
    try:
        trainer = Trainer(config, "reward", model, save_as="reward_model", tokenizer=tokenizer, dist=dist,
                          progress=progress)
        evaluate = (lambda: _evaluate(trainer.module, tokenizer, eval_pairs, config, device)) if eval_pairs else None
        model.train()
        return trainer.fit(lambda rng: rng.sample(pairs, min(config.batch_size, len(pairs))), collate,
                           lambda b: _pairs_loss(trainer.module, b[0], b[1], config.loss), lambda b: b[1].shape[0],
                           evaluate=evaluate, resume_from=resume_from, on_step=on_step, weight_name="pairs")
    finally:
        if bias_trainable:  # the attribute, not `bias`: FSDP replaces the parameter objects when it shards them
            model.head.bias.requires_grad_(True)


@torch.no_grad()
def _evaluate(module, tokenizer, pairs, config: RewardConfig, device) -> dict:
    was_training = module.training
    module.eval()
    sums = {"loss": 0.0, "accuracy": 0.0, "reward_margin": 0.0}
    for start in range(0, len(pairs), config.batch_size):
        batch, margins = pair_batch(tokenizer, pairs[start : start + config.batch_size], config.max_length)
        with autocast(config.precision, device):
            out = _pairs_loss(module, move(batch, device), margins.to(device), config.loss)
        for key in sums:
            sums[key] += float(out[key])
    module.train(was_training)
    return {k: v / max(1, len(pairs)) for k, v in sums.items()}


def evaluate_reward_model(model, tokenizer, pairs, config: RewardConfig) -> dict:
    """Accuracy (chosen scored above rejected), mean margin and loss over ``pairs``."""
    pairs = as_records(pairs, "preferences", "pairs")
    return _evaluate(model, tokenizer, pairs, config, next(model.parameters()).device)


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], max_length: int, batch_size: int = 32):
    """Reward of each (prompt, response) [N], fp32, encoded as in training (BOS + prompt + response + EOS)."""
    encoded = [encode_sft(tokenizer, p, r, max_length)[0] for p, r in zip(prompts, responses, strict=True)]
    return score_ids(model, encoded, tokenizer.pad_token_id, batch_size)


def score_ids(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """Reward of each token sequence [N], fp32, read at its last token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = collate_sft([(s, s) for s in sequences[start : start + batch_size]], pad_token_id)
        out.append(model.score(batch.input_ids.to(device), batch.attention_mask.to(device)))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
