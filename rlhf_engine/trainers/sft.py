"""Supervised fine-tuning: masked NLL on response tokens through ``linear_logprobs`` (no [B, T, V] logits).

    rlhf-engine sft --config sft.yaml [--lr 1e-5 ...]              # the CLI: data from JSONL, checkpoints, resume

    from rlhf_engine.trainers import SFTConfig, train_sft             # as a library, on records in memory
    history = train_sft(model, tokenizer, [(prompt, response), ...], SFTConfig(steps=200))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_engine.data.sft import IGNORE_INDEX, SFTBatch, collate_sft, encode_record, pack_sft
from rlhf_engine.ops import linear_logprobs
from rlhf_engine.trainers.common import TrainConfig, Trainer, move, option


@dataclass
class SFTConfig(TrainConfig):
    lr: float = option(2e-5, "peak learning rate (AdamW)")
    packing: bool = option(False, "pack several examples into each row of max_length tokens (no cross-attention)")


def sft_loss(model, batch: SFTBatch) -> tuple[torch.Tensor, int]:
    """Summed NLL over response tokens and their number: ``(loss_sum, n_tokens)``."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
    targets = batch.labels[:, 1:]
    head = model.get_output_embeddings()
    logp = linear_logprobs(hidden, head.weight, targets, bias=head.bias)
    return -logp.sum(), int((targets != IGNORE_INDEX).sum())


def _n_tokens(batch: SFTBatch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


class SFTData:
    """Encoded examples and the batch sampler (plain right-padded rows, or packed rows of ``max_length``)."""

    def __init__(self, tokenizer, records, config: SFTConfig):
        if not records:
            raise ValueError("SFT: no training examples")
        self.encoded = [encode_record(tokenizer, r, config.max_length) for r in records]
        self.pad = tokenizer.pad_token_id
        self.config = config

    def sample(self, rng) -> SFTBatch:
        cfg = self.config
        if not cfg.packing:
            return collate_sft(rng.sample(self.encoded, min(cfg.batch_size, len(self.encoded))), self.pad)
        rows, row, used = [], [], 0
        while len(rows) < cfg.batch_size:
            example = self.encoded[rng.randrange(len(self.encoded))]
            if used + len(example[0]) > cfg.max_length:
                rows.append(row)
                row, used = [], 0
            row.append(example)
            used += len(example[0])
        return pack_sft(rows, self.pad, cfg.max_length)

    def batches(self, batch_size: int):
        for start in range(0, len(self.encoded), batch_size):
            yield collate_sft(self.encoded[start : start + batch_size], self.pad)


def train_sft(model, tokenizer, examples, config: SFTConfig, *, progress: bool = True, on_step=None,
              eval_examples=None, resume_from: str | None = None) -> list[dict]:
    """Trains ``model`` in place on ``examples`` (SFTRecords or (prompt, response) pairs); one metrics dict a step.

    With ``config.output_dir`` set, metrics.jsonl and checkpoints go there and ``resume_from`` continues a run.
    """
    data = SFTData(tokenizer, examples, config)
    device = next(model.parameters()).device
    trainer = Trainer(config, "sft", model.parameters(), models={"policy": model}, tokenizer=tokenizer,
                      device=device, progress=progress)
    evaluate = None
    if eval_examples:
        eval_data = SFTData(tokenizer, eval_examples, config)
        evaluate = lambda: {"loss": _evaluate(model, eval_data, config)}  # noqa: E731
    model.train()
    return trainer.fit(lambda rng: move(data.sample(rng), device), lambda b: {"loss": sft_loss(model, b)[0]},
                       _n_tokens, evaluate=evaluate, resume_from=resume_from, on_step=on_step,
                       weight_name="tokens")


@torch.no_grad()
def _evaluate(model, data: SFTData, config: SFTConfig) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in data.batches(config.batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss_sum, n_tokens = sft_loss(model, move(batch, device))
        total += float(loss_sum)
        count += n_tokens
    model.train(was_training)
    return total / max(count, 1)


def evaluate_sft(model, tokenizer, examples, config: SFTConfig) -> float:
    """Mean response-token NLL over ``examples``."""
    return _evaluate(model, SFTData(tokenizer, examples, config), config)
