"""Supervised fine-tuning: masked NLL on response tokens through ``linear_logprobs`` (no [B, T, V] logits).

    rlhf-engine sft --config sft.yaml [--lr 1e-5 ...]              # the CLI: data from JSONL, checkpoints, resume

    from rlhf_engine.trainers import SFTConfig, train_sft             # as a library, on records in memory
    history = train_sft(model, tokenizer, [(prompt, response), ...], SFTConfig(steps=200))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_engine.data.jsonl import as_records
from rlhf_engine.data.sft import IGNORE_INDEX, SFTBatch, collate_sft, encode_record, pack_sft
from rlhf_engine.distributed import DistInfo
from rlhf_engine.models.heads import CausalLMLogprobs
from rlhf_engine.models.lora import unwrap_peft
from rlhf_engine.precision import autocast
from rlhf_engine.trainers.common import TrainConfig, Trainer, move, option


@dataclass
class SFTConfig(TrainConfig):
    lr: float = option(2e-5, "peak learning rate (AdamW)")
    packing: bool = option(False, "pack several examples into each row of max_length tokens (no cross-attention)")


def sft_loss(module, batch: SFTBatch) -> tuple[torch.Tensor, int]:
    """Summed NLL over response tokens and their number: ``(loss_sum, n_tokens)``.

    ``module`` is a ``CausalLMLogprobs`` (possibly FSDP/DDP-wrapped) or a plain transformers causal LM.
    """
    if hasattr(module, "get_output_embeddings"):
        module = CausalLMLogprobs(module)
    targets = batch.labels[:, 1:]  # position t predicts token t + 1
    logp = module(batch.input_ids, batch.attention_mask, targets, position_ids=batch.position_ids)
    return -logp.sum(), int((targets != IGNORE_INDEX).sum())


def _n_tokens(batch: SFTBatch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


class SFTData:
    """Encoded examples, the sampler of global batches and the collator (right-padded rows, or packed rows of
    ``max_length``)."""

    def __init__(self, tokenizer, records, config: SFTConfig, where: str = "examples"):
        if not records:
            raise ValueError(f"SFT: {where} is empty")
        self.encoded = [encode_record(tokenizer, r, config.max_length) for r in as_records(records, "sft", where)]
        self.pad = tokenizer.pad_token_id
        self.config = config

    def sample(self, rng) -> list:
        """``batch_size`` rows: examples, or with packing lists of examples filling ``max_length`` tokens."""
        cfg = self.config
        if not cfg.packing:
            return rng.sample(self.encoded, min(cfg.batch_size, len(self.encoded)))
        rows, row, used = [], [], 0
        while len(rows) < cfg.batch_size:
            example = self.encoded[rng.randrange(len(self.encoded))]
            if used + len(example[0]) > cfg.max_length:
                rows.append(row)
                row, used = [], 0
            row.append(example)
            used += len(example[0])
        return rows

    def collate(self, rows: list) -> SFTBatch:
        if self.config.packing:
            return pack_sft(rows, self.pad, self.config.max_length)
        return collate_sft(rows, self.pad)

    def batches(self, batch_size: int):
        for start in range(0, len(self.encoded), batch_size):
            yield collate_sft(self.encoded[start : start + batch_size], self.pad)


def train_sft(model, tokenizer, examples, config: SFTConfig, *, progress: bool = True, on_step=None,
              eval_examples=None, resume_from: str | None = None, dist: DistInfo | None = None) -> list[dict]:
    """Trains ``model`` in place on ``examples`` (SFTRecords, dicts as in the JSONL files, or (prompt, response)
    pairs); one metrics dict a step.

    With ``config.output_dir`` set, metrics.jsonl and checkpoints go there and ``resume_from`` continues a run
    (whose weights the caller loaded from the checkpoint); ``dist`` makes it one rank of a data-parallel run.
    """
    model = unwrap_peft(model)
    data = SFTData(tokenizer, examples, config)
    device = next(model.parameters()).device
    trainer = Trainer(config, "sft", CausalLMLogprobs(model), tokenizer=tokenizer, dist=dist, progress=progress)
    evaluate = None
    if eval_examples:
        eval_data = SFTData(tokenizer, eval_examples, config, "eval_examples")
        evaluate = lambda: {"loss": _evaluate(trainer.module, eval_data, config, device)}  # noqa: E731
    model.train()
    return trainer.fit(data.sample, lambda rows: move(data.collate(rows), device),
                       lambda b: {"loss": sft_loss(trainer.module, b)[0]}, _n_tokens, evaluate=evaluate,
                       resume_from=resume_from, on_step=on_step, weight_name="tokens")


@torch.no_grad()
def _evaluate(module, data: SFTData, config: SFTConfig, device) -> float:
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for batch in data.batches(config.batch_size):
        with autocast(config.precision, device):
            loss_sum, n_tokens = sft_loss(module, move(batch, device))
        total += float(loss_sum)
        count += n_tokens
    module.train(was_training)
    return total / max(count, 1)


def evaluate_sft(model, tokenizer, examples, config: SFTConfig) -> float:
    """Mean response-token NLL over ``examples``."""
    return _evaluate(model, SFTData(tokenizer, examples, config), config, next(model.parameters()).device)
