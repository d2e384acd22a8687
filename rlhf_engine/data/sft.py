"""SFT examples: (prompt, response) -> token ids with the prompt masked out of the loss.

Truncation rule: the prompt is kept whole and the response is cut to fit ``max_length`` (the EOS token is kept
only when it fits); a prompt that leaves no room for a single response token is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def encode_sft(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Returns ``(input_ids, labels)``: BOS + prompt + response + EOS, labels -100 on BOS and the prompt."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens leaves no room in max_length={max_length}: raise max_length "
            f"or shorten the prompt ({prompt[:60]!r}...)"
        )
    response_ids = response_ids[:room]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64, 1 = real token
    labels: torch.Tensor  # [B, T] int64, -100 = not in the loss


def collate_sft(encoded: list[tuple[list[int], list[int]]], pad_token_id: int) -> SFTBatch:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return SFTBatch(input_ids, attention_mask, labels)
