"""Fused token log-probs for a Hugging Face causal LM, for any training loop (no rlhf-engine trainer needed).

    logp = logprobs_from_model(model, input_ids, attention_mask, response_mask)    # [B, T-1] fp32, differentiable
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, response_mask[:, 1:])

The model's body (``model.base_model``: ``model.model`` / ``model.transformer``) runs as usual; the LM head is not
called as a module: its weight (and bias) go to ``rlhf_engine.ops.linear_logprobs``, which never holds the
[B, T, V] logits and multiplies only the rows that count by the head (``models.heads.CausalLMLogprobs``, the
trainers' own unit).

Alignment ("target space", as in rlhf-engine's trainers): for input_ids [B, T], position t of the [B, T-1]
output is log p(input_ids[:, t + 1] | input_ids[:, :t + 1]); it is nonzero only where response_mask[:, t + 1]
(and attention_mask[:, t + 1]) is, and 0 with no gradient elsewhere. So ``response_mask[:, 1:]`` is the mask
that goes with the output.

``collate_rollouts`` pads the output of ``RolloutEngine.generate`` into these tensors.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.models.heads import CausalLMLogprobs, position_ids_for

_MASK_DTYPES = "bool or an integer dtype"


def _is_int(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _check_inputs(input_ids, attention_mask, response_mask, temperature) -> None:
    op = "logprobs_from_model"
    if not isinstance(input_ids, torch.Tensor) or not _is_int(input_ids):
        found = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"{op}: input_ids must be an integer tensor of token ids [B, T], found {found}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"{op}: input_ids must have shape [B, T] with T >= 2, found {tuple(input_ids.shape)}")
    for name, mask in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor [B, T] ({_MASK_DTYPES}), found {type(mask).__name__}")
        if not (_is_int(mask) or mask.dtype == torch.bool):
            raise TypeError(f"{op}: {name} must be {_MASK_DTYPES} (1 = counts), found {mask.dtype}; cast with .long()")
        if mask.shape != input_ids.shape:
            raise ValueError(
                f"{op}: {name} shape {tuple(mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        if mask.device != input_ids.device:
            raise ValueError(f"{op}: {name} is on {mask.device} but input_ids on {input_ids.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"{op}: temperature must be a finite number > 0, found {temperature!r}")


def _check_model(model):
    """The LM head module of a transformers causal LM, after checking the adapter computes its log-probs exactly."""
    op = "logprobs_from_model"
    name = type(model).__name__
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and get_base() is not model:  # a PEFT wrapper: its base_model is the adapter, not a body
        raise ValueError(f"{op}: model ({name}) wraps another model; pass model.get_base_model()")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError(f"{op}: model ({name}) has no linear LM head (get_output_embeddings()); pass a *ForCausalLM")
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"{op}: model ({name}) exposes no transformer body as model.base_model")
    return head


def logprobs_from_model(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of a Hugging Face causal LM through the fused ``linear_logprobs``.

    Shapes: input_ids [B, T] integer (T >= 2), attention_mask [B, T] (bool or integer, 1 = real token; left or
    right padding), response_mask [B, T] (bool or integer, 1 = a token whose log-prob is wanted), all on the
    model's device. Returns logp [B, T-1] fp32, or ``(logp, entropy)`` [B, T-1] fp32 with ``return_entropy``:

        logp[b, t]    = log softmax(transform(head(h[b, t])) / temperature)[input_ids[b, t + 1]]
        entropy[b, t] = -sum_v p_v log p_v of that tempered distribution

    where h is the body's last hidden state with position ids counted over the real tokens (``position_ids_for``,
    as generation uses them), so left padding does not shift positions. Positions whose next token is not in the
    response (or is padding) are 0 and get no gradient. Gradients flow to the body and the LM head (bias too).
    Models that transform their logits beyond head(hidden) get the same transform, fused: final logit
    soft-capping (Gemma 2/3) and logit scales (Granite, Cohere, Falcon-H1), read from the config
    (``models.heads.logit_transform``).
    """
    _check_inputs(input_ids, attention_mask, response_mask, temperature)
    head = _check_model(model)
    if input_ids.device != head.weight.device:
        raise ValueError(
            f"logprobs_from_model: input_ids is on {input_ids.device} but the model's LM head on {head.weight.device}"
        )
    vocab_size = head.weight.shape[0]
    # NOTE: one device sync; the embedding lookup would otherwise fail with a bare IndexError (or fault on GPU)
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        raise ValueError(
            f"logprobs_from_model: input_ids must lie in [0, {vocab_size}) (the LM head's vocabulary), found "
            f"{input_ids[bad][0].item()} ({int(bad.sum())} such position(s)); padding too needs a valid id"
        )
    counted = response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # [B, T-1]
    targets = input_ids[:, 1:].masked_fill(~counted, -100)
    # the trainers' own unit: body (use_cache off) -> linear_logprobs(last_hidden_state[:, :-1], head)
    return CausalLMLogprobs(model)(input_ids, attention_mask, targets, position_ids=position_ids_for(attention_mask),
                                   temperature=float(temperature), return_entropy=return_entropy)


def collate_rollouts(
    outputs: list, pad_token_id: int, *, padding_side: str = "right", device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Pads ``RolloutEngine.generate`` outputs into the tensors ``logprobs_from_model`` takes.

    Row r = i * n + k holds prompt i with its k-th sample (the layout ``group_advantages`` expects). Returns
    input_ids [B, T] long (prompt + sample + padding), attention_mask [B, T] long, response_mask [B, T] long (1 on
    the sampled tokens), and rollout_logprobs [B, T-1] fp32 in target space (position t: the sampler's log-prob
    of token t + 1; 0 off the response), T being the longest prompt + sample.
    """
    op = "collate_rollouts"
    if padding_side not in ("left", "right"):
        raise ValueError(f"{op}: padding_side must be 'left' or 'right', found {padding_side!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"{op}: pad_token_id must be an int, found {pad_token_id!r}")
    if not isinstance(outputs, (list, tuple)) or not outputs:
        raise ValueError(f"{op}: outputs must be the non-empty list RolloutEngine.generate returned")
    rows = []
    for i, out in enumerate(outputs):
        if not hasattr(out, "prompt_token_ids") or not hasattr(out, "samples"):
            raise TypeError(f"{op}: outputs[{i}] is a {type(out).__name__}, not a RolloutOutput")
        rows.extend((list(out.prompt_token_ids), s) for s in out.samples)
    width = max(len(p) + len(s.token_ids) for p, s in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width), dtype=torch.long)
    rollout_logprobs = torch.zeros((b, width - 1), dtype=torch.float32)
    for r, (prompt, sample) in enumerate(rows):
        n_prompt, n_total = len(prompt), len(prompt) + len(sample.token_ids)
        start = 0 if padding_side == "right" else width - n_total
        input_ids[r, start : start + n_total] = torch.tensor(prompt + list(sample.token_ids), dtype=torch.long)
        attention_mask[r, start : start + n_total] = 1
        response_mask[r, start + n_prompt : start + n_total] = 1
        # target space: the log-prob of token j sits at position j - 1
        rollout_logprobs[r, start + n_prompt - 1 : start + n_total - 1] = torch.tensor(sample.logprobs)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                 rollout_logprobs=rollout_logprobs)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
