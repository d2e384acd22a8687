"""A causal LM body with a scalar head: per-token values (the PPO critic) and a sequence score read at the last
real token (the reward model). Saved as a Hugging Face model directory plus ``scalar_head.safetensors``."""

from __future__ import annotations

import functools
import inspect
import json
import os

import torch
from torch import nn

from rlhf_engine.models.loading import text_config
from rlhf_engine.models.lora import has_lora, save_adapter, unwrap_peft
from rlhf_engine.ops import linear_logprobs

HEAD_FILE = "scalar_head.safetensors"
HEAD_CONFIG = "scalar_head.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token [B], for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1).clamp(min=0)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.cache
def _cache_argument(body_class) -> str:
    """The KV-cache keyword of a transformers body: ``cache`` in newer releases, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(body_class.forward).parameters else "past_key_values"


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def save_lm(lm, path: str, state_dict: dict | None = None) -> None:
    """``lm`` as a Hugging Face directory, or only its adapter (peft's format) when it carries LoRA adapters:
    the base weights are frozen and already on disk."""
    if has_lora(lm):
        save_adapter(lm, path, state_dict)
    elif state_dict is None:
        lm.save_pretrained(path)
    else:
        lm.save_pretrained(path, state_dict=state_dict)


# Config attributes that transform a causal LM's logits beyond head(hidden), as its own forward applies them (the
# scales first, then the soft cap): (attribute, how it enters logit_scale)
_LOGIT_SCALES = (("logit_scale", "mul"),          # Cohere: logits * logit_scale
                 ("logits_scaling", "div"),       # Granite: logits / logits_scaling
                 ("lm_head_multiplier", "mul"),   # Falcon-H1: lm_head(h) * lm_head_multiplier
                 ("output_multiplier", "mul"))    # MuseGlimmer: scaled, then Gemma-style soft-capped


def logit_transform(config) -> dict:
    """``{"softcap": ..., "logit_scale": ...}`` for ``linear_logprobs`` from a transformers config: final logit
    soft-capping (Gemma 2/3 ``final_logit_softcapping``) and the product of the logit scales above (1.0 and None
    for a plain ``head(hidden)``)."""
    text = text_config(config)
    scale = 1.0
    for attr, how in _LOGIT_SCALES:
        value = getattr(text, attr, None)
        if value is not None:
            scale = scale * value if how == "mul" else scale / value
    return {"softcap": getattr(text, "final_logit_softcapping", None), "logit_scale": float(scale)}


class CausalLMLogprobs(nn.Module):
    """A transformers causal LM whose forward returns per-token log-probs through ``linear_logprobs``.

    The unit the trainers hand to FSDP/DDP: one forward covers the body and the LM head, so sharded parameters
    are gathered (and their gradients reduced) by the wrapper's hooks, and the [B, T, V] logits never exist.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = unwrap_peft(lm)
        self.transform = logit_transform(lm.config)  # soft-capping, logit scales: fused into linear_logprobs

    def forward(self, input_ids, attention_mask, targets, *, position_ids=None, temperature: float = 1.0,
                return_entropy: bool = False, shared_prompts: tuple[int, list[int]] | None = None):
        """log-probs [B, T-1] of ``targets`` [B, T-1] (position t predicts token t + 1); -100 targets give 0.

        ``shared_prompts=(n, prompt_lengths)``: the rows come in groups of n that start with the same prompt (of
        ``prompt_lengths[i]`` tokens for group i) and are right-padded, as rollouts of n samples per prompt are.
        Each prompt then runs once and its KV is shared by its n rows, which run only their response tokens: the
        same log-probs and gradients with about n times less prompt work.
        """
        if shared_prompts is not None and shared_prompts[0] > 1:
            return self._shared_prompt_forward(input_ids, attention_mask, targets, *shared_prompts,
                                               temperature=temperature, return_entropy=return_entropy)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
        head = self.lm.get_output_embeddings()
        result = linear_logprobs(out.last_hidden_state[:, :-1], head.weight, targets, bias=head.bias,
                                 temperature=temperature, return_entropy=return_entropy, **self.transform)
        # NOTE: the op returns views of its flat outputs; this module is what FSDP2 wraps, and FSDP2 warns on a view
        # output (an in-place op on it would skip its hooks), so [B, T-1] floats are copied once
        return tuple(t.clone() for t in result) if return_entropy else result.clone()

    def _shared_prompt_forward(self, input_ids, attention_mask, targets, n: int, prompt_lengths: list[int], *,
                               temperature: float, return_entropy: bool):
        from transformers import DynamicCache

        b, width = input_ids.shape
        device = input_ids.device
        groups = len(prompt_lengths)
        if groups * n != b:
            raise ValueError(f"shared_prompts: {groups} prompts x n={n} != {b} rows")
        plen = torch.tensor(prompt_lengths, device=device)  # [U]
        p_max = int(plen.max())
        cols = torch.arange(p_max, device=device)
        prompt_mask = (cols[None] < plen[:, None]).long()  # [U, Pmax], right-padded prompts
        cache = DynamicCache(config=self.lm.config)
        kv = _cache_argument(type(self.lm.base_model))
        first = self.lm.base_model(input_ids=input_ids[::n, :p_max], attention_mask=prompt_mask, use_cache=True,
                                   **{kv: cache})
        cache.batch_repeat_interleave(n)  # each prompt's KV for its n rows (a differentiable copy)
        row_plen = plen.repeat_interleave(n)  # [B]
        lengths = attention_mask.long().sum(-1)  # [B]
        r_max = int((lengths - row_plen).max())
        j = torch.arange(r_max, device=device)
        index = (row_plen[:, None] + j[None]).clamp(max=width - 1)  # [B, R]: response token j of each row
        in_response = (j[None] < (lengths - row_plen)[:, None])
        response_ids = torch.where(in_response, input_ids.gather(1, index), 0)
        full_mask = torch.cat([prompt_mask.repeat_interleave(n, 0), in_response.long()], dim=1)
        second = self.lm.base_model(input_ids=response_ids, attention_mask=full_mask,
                                    position_ids=row_plen[:, None] + j[None], use_cache=True, **{kv: cache})
        # hidden state predicting response token j: the last prompt token's for j = 0, response token j-1's after
        last_prompt = first.last_hidden_state[torch.arange(groups, device=device), plen - 1]  # [U, H]
        hidden = torch.cat([last_prompt.repeat_interleave(n, 0)[:, None], second.last_hidden_state[:, :-1]], dim=1)
        target_index = (row_plen[:, None] - 1 + j[None]).clamp(max=width - 2)  # [B, R] in target space
        response_targets = torch.where(in_response, targets.gather(1, target_index), -100)
        head = self.lm.get_output_embeddings()
        out = linear_logprobs(hidden, head.weight, response_targets, bias=head.bias, temperature=temperature,
                              return_entropy=return_entropy, **self.transform)
        results = out if return_entropy else (out,)
        scattered = []
        for values in results:  # back to target space [B, T-1]; prompt and padding positions stay 0
            full = values.new_zeros(b, width - 1)
            scattered.append(full.scatter_add(1, target_index, torch.where(in_response, values, 0.0)))
        return tuple(scattered) if return_entropy else scattered[0]

    def save_pretrained(self, path: str, state_dict: dict | None = None) -> None:
        save_lm(self.lm, path, None if state_dict is None else _strip(state_dict, "lm."))


class ScalarHeadModel(nn.Module):
    """``lm`` (a transformers causal LM; its body is used, its LM head is not) plus ``head``: Linear(hidden, 1)."""

    def __init__(self, lm, head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm = unwrap_peft(lm)
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.head = head if head is not None else nn.Linear(hidden, 1)
        if head is None:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.head.bias)
        self.head.to(next(lm.parameters()).dtype)
        # the LM head is not part of this model's function: keep it out of the optimizer and of autograd
        for p in lm.get_output_embeddings().parameters():
            if all(p is not q for q in lm.get_input_embeddings().parameters()):
                p.requires_grad_(False)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token values [B, T] (what FSDP/DDP wrap: training calls the module, not ``values``)."""
        return self.values(input_ids, attention_mask)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token scalar [B, T], fp32."""
        out = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)
        )
        # NOTE: a sum over the size-1 dim, not squeeze: exact, and a new tensor (FSDP2 warns when a wrapped module
        # returns a view, since an in-place op on it could escape autograd)
        return self.head(out.last_hidden_state).sum(-1, dtype=torch.float32)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value at each sequence's last real token [B], fp32."""
        values = self.values(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    def save_pretrained(self, path: str, state_dict: dict | None = None) -> None:
        """The LM as a HF directory plus the head; ``state_dict`` (of this module) replaces the live weights, as
        when a sharded model's full state was gathered first."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        save_lm(self.lm, path, None if state_dict is None else _strip(state_dict, "lm."))
        head_state = self.head.state_dict() if state_dict is None else _strip(state_dict, "head.")
        tensors = {k: v.detach().contiguous() for k, v in head_state.items()}
        save_file(tensors, os.path.join(path, HEAD_FILE))
        with open(os.path.join(path, HEAD_CONFIG), "w") as f:
            json.dump({"in_features": self.head.in_features, "kind": "scalar_head"}, f)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", device="cpu", init_head: bool = False,
                        base: str | None = None, lora: dict | None = None):
        """Loads a model saved by ``save_pretrained``; with ``init_head`` a plain LM directory gets a new head. A
        LoRA run's directory (an adapter and the head) loads onto the LM at ``base`` (see ``load_causal_lm``)."""
        from safetensors.torch import load_file

        from rlhf_engine.models.loading import load_causal_lm

        lm = load_causal_lm(path, dtype=dtype, device=device, base=base, lora=lora)
        head_path = os.path.join(path, HEAD_FILE)
        if not os.path.isfile(head_path):
            if init_head:
                return cls(lm).to(device)
            raise FileNotFoundError(
                f"{path!r} has no {HEAD_FILE}: it is a plain LM, not a reward/value model; pass init_head=True to "
                f"start a new head on it"
            )
        model = cls(lm)
        model.head.load_state_dict(load_file(head_path))
        return model.to(device)
