"""SFT examples: (prompt, response) or chat messages -> token ids with the prompt masked out of the loss; batching
by right padding or by packing several examples into one row.

Truncation rule: the prompt is kept whole and the response is cut to fit ``max_length`` (the EOS token is kept
only when it fits); a prompt that leaves no room for a single response token is an error.

Chat records (``messages``) are rendered with the tokenizer's chat template: the prompt is the template applied
to every message but the last with the generation prompt added, the response is the rest of the full rendering
(the assistant's content and the template's end-of-turn tokens), so the model learns to stop as the template does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def _check_room(prompt_ids: list[int], max_length: int, what: str) -> int:
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_length={max_length}: raise "
                         f"max_length or shorten the prompt ({what[:60]!r}...)")
    return room


def encode_sft(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Returns ``(input_ids, labels)``: BOS + prompt + response + EOS, labels -100 on BOS and the prompt."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    response_ids = response_ids[: _check_room(prompt_ids, max_length, prompt)]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_chat(tokenizer, messages, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a chat whose last message is the assistant's, through the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a 'messages' record needs a tokenizer with a chat template (tokenizer.chat_template is "
                         "unset): save one with the tokenizer, or write the data as prompt/response records")
    messages = [dict(m) for m in messages]
    prefix = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prefix):
        raise ValueError("the chat template renders the conversation differently with and without its last "
                         "message, so the prompt/response split is ambiguous; use prompt/response records")
    prompt_ids = tokenizer.encode(prefix, add_special_tokens=False)
    response_ids = tokenizer.encode(full[len(prefix):], add_special_tokens=False)
    response_ids = response_ids[: _check_room(prompt_ids, max_length, prefix)]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_record(tokenizer, record, max_length: int) -> tuple[list[int], list[int]]:
    """An ``SFTRecord`` (or a ``(prompt, response)`` pair) as ``(input_ids, labels)``."""
    if isinstance(record, tuple) and not hasattr(record, "messages"):
        return encode_sft(tokenizer, record[0], record[1], max_length)
    if record.messages:
        return encode_chat(tokenizer, record.messages, max_length)
    return encode_sft(tokenizer, record.prompt, record.response, max_length)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor | None  # [B, T] int64, 1 = real token; None for packed rows
    labels: torch.Tensor  # [B, T] int64, -100 = not in the loss
    position_ids: torch.Tensor | None = None  # [B, T] int64, restarting at 0 for each packed example


def collate_sft(encoded: list[tuple[list[int], list[int]]], pad_token_id: int) -> SFTBatch:
    """Right-padded rows, one example each."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return SFTBatch(input_ids, attention_mask, labels)


def pack_sft(rows: list[list[tuple[list[int], list[int]]]], pad_token_id: int, width: int) -> SFTBatch:
    """Each inner list of examples concatenated into one row of ``width`` tokens.

    Position ids restart at 0 for every example (and for the padding tail), and no attention mask is passed:
    transformers then builds a block-diagonal causal mask from the position ids, so examples sharing a row never
    attend to each other. The first label of each example is -100 (BOS or prompt), so no token is predicted
    across a boundary.
    """
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, examples in enumerate(rows):
        start = 0
        for ids, labs in examples:
            end = start + len(ids)
            if end > width:
                raise ValueError(f"pack_sft: row {r} holds {end} tokens, more than width={width}")
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start:end] = torch.tensor(labs)
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    return SFTBatch(input_ids, None, labels, position_ids)


def response_tokens(encoded: tuple[list[int], list[int]]) -> int:
    return sum(1 for label in encoded[1][1:] if label != IGNORE_INDEX)
