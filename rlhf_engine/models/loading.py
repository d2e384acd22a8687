"""Loading a causal LM and its tokenizer from a local Hugging Face model directory."""

from __future__ import annotations

import os

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what save_pretrained writes for the tokenizer kinds in use (fast tokenizers, sentencepiece, BPE and WordPiece vocabs)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tekken.json")


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path!r} is not a directory; pass a model saved with save_pretrained")
    if what == "model" and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model: {path!r} has no config.json; is it a Hugging Face model directory?")


def max_positions(model) -> int | None:
    """The longest sequence ``model`` (a causal LM, or a module holding one as ``.lm``) has positions for: its
    config's max_position_embeddings (GPT-2's n_positions); None when the config declares none."""
    config = getattr(getattr(model, "lm", model), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def load_causal_lm(path: str, *, dtype: str = "float32", device: str | torch.device = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` from a local directory (never the network)."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, found {dtype!r}")
    _check_dir(path, "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], local_files_only=True)
    return model.to(device)


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained`` from a local directory; a pad token is required for batching."""
    from transformers import AutoTokenizer

    _check_dir(path, "tokenizer")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"tokenizer: {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): set `tokenizer:` "
            f"in the YAML file (or --tokenizer DIR) to a directory that has one, or save one into the model "
            f"directory with tokenizer.save_pretrained({path!r})")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
