"""Per-family forward pieces for the rollout engine, calling the Hugging Face modules' own weights.

The HF forward stays what training uses; rollout needs the same math split at the attention so that K/V go to
the paged cache and decode attention reads it back. Supported: the Llama family (Llama, Mistral, Qwen2:
RMSNorm, RoPE, GQA, SwiGLU) and GPT-2. Nothing is copied: every projection below is the model's own module.
"""

from __future__ import annotations

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


class LlamaFamily:
    """Llama / Mistral / Qwen2: pre-norm blocks, RoPE on q and k, grouped-query attention, gated MLP."""

    def __init__(self, model):
        config = model.config
        if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)
        ):
            self.sliding_window = getattr(config, "sliding_window", None)
        else:
            self.sliding_window = None
        self.model = model
        self.base = model.base_model
        self.layers = list(self.base.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.vocab_size = config.vocab_size
        self.max_positions = getattr(config, "max_position_embeddings", None)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """input_ids, positions [N] -> (hidden [N, hidden], rope) where rope is shared by every layer."""
        hidden = self.base.embed_tokens(input_ids)
        cos, sin = self.base.rotary_emb(hidden[None], positions[None])  # (1, N, D)
        return hidden, (cos[0, :, None, :], sin[0, :, None, :])  # (N, 1, D): broadcast over heads

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def attention_inputs(self, index: int, hidden: torch.Tensor, rope):
        """-> q [N, H, D], k [N, KV, D], v [N, KV, D] for layer ``index`` (RoPE applied)."""
        layer = self.layers[index]
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        n = h.shape[0]
        q = attn.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def attention_output(self, index: int, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (the block's input), attn_out [N, H * D] -> the block's output."""
        layer = self.layers[index]
        hidden = hidden + layer.self_attn.o_proj(attn_out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.base.norm(hidden))


class GPT2Family:
    """GPT-2: learned positions, pre-norm blocks, fused qkv (Conv1D), GELU MLP, multi-head attention."""

    sliding_window = None

    def __init__(self, model):
        config = model.config
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(config, flag, False):
                raise ValueError(f"RolloutEngine: GPT-2 with {flag}=True is not supported")
        self.model = model
        self.base = model.transformer
        self.layers = list(self.base.h)
        self.num_heads = config.n_head
        self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        self.vocab_size = config.vocab_size
        self.max_positions = config.n_positions

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        return self.base.wte(input_ids) + self.base.wpe(positions), None

    def attention_inputs(self, index: int, hidden: torch.Tensor, rope):
        block = self.layers[index]
        n = hidden.shape[0]
        qkv = block.attn.c_attn(block.ln_1(hidden))  # (N, 3 * hidden)
        q, k, v = qkv.split(self.num_heads * self.head_dim, dim=-1)
        shape = (n, self.num_heads, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)

    def attention_output(self, index: int, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        block = self.layers[index]
        hidden = hidden + block.attn.c_proj(attn_out)
        return hidden + block.mlp(block.ln_2(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.base.ln_f(hidden))


def family_for(model):
    """The adapter for ``model``'s architecture, or a ValueError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("llama", "mistral", "qwen2"):
        return LlamaFamily(model)
    if model_type == "gpt2":
        return GPT2Family(model)
    raise ValueError(
        f"RolloutEngine: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)} "
        f"(a causal LM from transformers)"
    )
