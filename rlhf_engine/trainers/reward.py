"""Reward-model training on preference pairs: a causal LM body plus a scalar head read at the last real token.

    from rlhf_engine.trainers.reward import RewardConfig, train_reward_model
    history = train_reward_model(rm, tokenizer, pairs, RewardConfig(steps=200))      # rm: ScalarHeadModel

Losses: ``bt`` (Bradley-Terry) = -logsigmoid(r_chosen - r_rejected - margin), with each pair's ``margin`` field;
``margin-ranking`` = max(0, margin - (r_chosen - r_rejected)) (torch's MarginRankingLoss with y = 1), where the
margin is the pair's field or ``RewardConfig.margin``. Sequences are BOS + prompt + response + EOS, cut at
``max_length`` from the right (the prompt is kept whole; a prompt that leaves no room is an error).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_engine.data.sft import collate_sft, encode_sft
from rlhf_engine.trainers.sft import _schedule

LOSSES = ("bt", "margin-ranking")


@dataclass
class RewardConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    loss: str = "bt"
    margin: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RewardConfig.{name} must be a positive int, found {getattr(self, name)!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"RewardConfig.loss must be one of {list(LOSSES)}, found {self.loss!r}")
        if not self.lr > 0:
            raise ValueError(f"RewardConfig.lr must be > 0, found {self.lr!r}")


def _encode(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    return encode_sft(tokenizer, prompt, response, max_length)[0]


def _batch(tokenizer, pairs, max_length, device):
    """Chosen rows then rejected rows, right-padded: (input_ids [2B, T], attention_mask [2B, T], margins [B])."""
    sequences = [_encode(tokenizer, p.prompt, p.chosen, max_length) for p in pairs]
    sequences += [_encode(tokenizer, p.prompt, p.rejected, max_length) for p in pairs]
    batch = collate_sft([(s, s) for s in sequences], tokenizer.pad_token_id)
    margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=device)
    return batch.input_ids.to(device), batch.attention_mask.to(device), margins


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor, kind: str) -> torch.Tensor:
    diff = chosen - rejected
    if kind == "bt":
        return -F.logsigmoid(diff - margins).mean()
    return F.relu(margins - diff).mean()


def train_reward_model(model, tokenizer, pairs, config: RewardConfig, *, progress: bool = True, on_step=None):
    """Trains ``model`` (a ScalarHeadModel) in place; returns one metrics dict a step (loss, accuracy, margin)."""
    if not pairs:
        raise ValueError("train_reward_model: pairs is empty")
    from tqdm.auto import tqdm

    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    model.train()
    history = []
    bar = tqdm(range(config.steps), desc="reward model", disable=not progress, dynamic_ncols=True)
    for step in bar:
        chunk = rng.sample(pairs, min(config.batch_size, len(pairs)))
        if config.loss == "margin-ranking":
            chunk = [p if p.margin else type(p)(p.prompt, p.chosen, p.rejected, config.margin) for p in chunk]
        input_ids, attention_mask, margins = _batch(tokenizer, chunk, config.max_length, device)
        scores = model.score(input_ids, attention_mask)
        chosen, rejected = scores.chunk(2)
        loss = reward_loss(chosen, rejected, margins, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        row = {
            "step": step,
            "loss": loss.item(),
            "accuracy": (chosen > rejected).float().mean().item(),
            "reward_margin": (chosen - rejected).mean().item(),
            "grad_norm": float(grad_norm),
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
        if on_step is not None:
            on_step(row)
    return history


@torch.no_grad()
def evaluate_reward_model(model, tokenizer, pairs, config: RewardConfig) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin over ``pairs``."""
    model.eval()
    device = next(model.parameters()).device
    correct, margin_sum = 0, 0.0
    for start in range(0, len(pairs), config.batch_size):
        chunk = pairs[start : start + config.batch_size]
        input_ids, attention_mask, _ = _batch(tokenizer, chunk, config.max_length, device)
        chosen, rejected = model.score(input_ids, attention_mask).chunk(2)
        correct += int((chosen > rejected).sum())
        margin_sum += float((chosen - rejected).sum())
    model.train()
    return {"accuracy": correct / max(1, len(pairs)), "reward_margin": margin_sum / max(1, len(pairs))}


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], max_length: int, batch_size: int = 32):
    """Reward of each (prompt, response) [N], fp32."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        seqs = [
            _encode(tokenizer, p, r, max_length)
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True)
        ]
        batch = collate_sft([(s, s) for s in seqs], tokenizer.pad_token_id)
        out.append(model.score(batch.input_ids.to(device), batch.attention_mask.to(device)))
    model.train()
    return torch.cat(out) if out else torch.zeros(0)
