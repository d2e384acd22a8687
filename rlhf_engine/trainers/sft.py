"""Supervised fine-tuning: masked NLL on response tokens through ``linear_logprobs`` (no [B, T, V] logits).

    from rlhf_engine.trainers import SFTConfig, train_sft
    history = train_sft(model, tokenizer, [(prompt, response), ...], SFTConfig(steps=200))
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch

from rlhf_engine.data.sft import IGNORE_INDEX, SFTBatch, collate_sft, encode_sft
from rlhf_engine.ops import linear_logprobs


@dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be a positive int, found {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"SFTConfig.lr must be > 0, found {self.lr!r}")
        if self.warmup_steps < 0 or self.max_grad_norm <= 0:
            raise ValueError("SFTConfig.warmup_steps must be >= 0 and max_grad_norm > 0")


def sft_loss(model, batch: SFTBatch) -> tuple[torch.Tensor, int]:
    """Mean NLL over response tokens; returns ``(loss, number of response tokens)``."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
    targets = batch.labels[:, 1:]
    head = model.get_output_embeddings()
    logp = linear_logprobs(hidden, head.weight, targets, bias=head.bias)
    n_tokens = int((targets != IGNORE_INDEX).sum())
    return -logp.sum() / max(n_tokens, 1), n_tokens


def _schedule(config: SFTConfig):
    def factor(step: int) -> float:  # linear warmup, then cosine to 10%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_sft(model, tokenizer, examples, config: SFTConfig, *, progress: bool = True, on_step=None) -> list[dict]:
    """Trains ``model`` in place on ``examples`` (pairs of prompt, response); returns one metrics dict a step."""
    if not examples:
        raise ValueError("train_sft: examples is empty")
    from tqdm.auto import tqdm

    encoded = [encode_sft(tokenizer, p, r, config.max_length) for p, r in examples]
    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    model.train()
    history = []
    bar = tqdm(range(config.steps), desc="sft", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = collate_sft(rng.sample(encoded, min(config.batch_size, len(encoded))), tokenizer.pad_token_id)
        batch = SFTBatch(*(t.to(device) for t in dataclasses.astuple(batch)))
        loss, n_tokens = sft_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        row = {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        row["tokens"] = n_tokens
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if on_step is not None:
            on_step(row)
    return history


@torch.no_grad()
def evaluate_sft(model, tokenizer, examples, config: SFTConfig) -> float:
    """Mean response-token NLL over ``examples``."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    encoded = [encode_sft(tokenizer, p, r, config.max_length) for p, r in examples]
    for start in range(0, len(encoded), config.batch_size):
        batch = collate_sft(encoded[start : start + config.batch_size], tokenizer.pad_token_id)
        batch = SFTBatch(*(t.to(device) for t in dataclasses.astuple(batch)))
        loss, n_tokens = sft_loss(model, batch)
        total += loss.item() * n_tokens
        count += n_tokens
    model.train()
    return total / max(count, 1)
