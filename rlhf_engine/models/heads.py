"""A causal LM body with a scalar head: per-token values (the PPO critic) and a sequence score read at the last
real token (the reward model). Saved as a Hugging Face model directory plus ``scalar_head.safetensors``."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

HEAD_FILE = "scalar_head.safetensors"
HEAD_CONFIG = "scalar_head.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token [B], for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1).clamp(min=0)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ScalarHeadModel(nn.Module):
    """``lm`` (a transformers causal LM; its body is used, its LM head is not) plus ``head``: Linear(hidden, 1)."""

    def __init__(self, lm, head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
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

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token scalar [B, T], fp32."""
        out = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)
        )
        return self.head(out.last_hidden_state).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value at each sequence's last real token [B], fp32."""
        values = self.values(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.lm.save_pretrained(path)
        tensors = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(tensors, os.path.join(path, HEAD_FILE))
        with open(os.path.join(path, HEAD_CONFIG), "w") as f:
            json.dump({"in_features": self.head.in_features, "kind": "scalar_head"}, f)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", device="cpu", init_head: bool = False):
        """Loads a model saved by ``save_pretrained``; with ``init_head`` a plain LM directory gets a new head."""
        from safetensors.torch import load_file

        from rlhf_engine.models.loading import load_causal_lm

        lm = load_causal_lm(path, dtype=dtype, device=device)
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
