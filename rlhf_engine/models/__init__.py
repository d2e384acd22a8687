"""Loading Hugging Face causal LMs (and, later, value heads and reward models)."""

from rlhf_engine.models.loading import load_causal_lm, load_tokenizer

__all__ = ["load_causal_lm", "load_tokenizer"]
