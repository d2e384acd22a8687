"""Loading a causal LM and its tokenizer from a local Hugging Face model directory."""

from __future__ import annotations

import contextlib
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


def text_config(config):
    """The language model's config: a composite (multimodal) config's text part, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(model) -> int | None:
    """The longest sequence ``model`` (a causal LM, or a module holding one as ``.lm``) has positions for: its
    config's max_position_embeddings (GPT-2's n_positions); None when the config declares none."""
    config = getattr(getattr(model, "lm", model), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def enable_gradient_checkpointing(lm) -> None:
    """transformers' own activation checkpointing on ``lm``'s decoder layers (non-reentrant, so it composes with
    FSDP2 and with inputs that need no gradient): each layer keeps only its input and recomputes the rest in the
    backward. Active only in training mode with gradients on; no-grad passes and generation run as before."""
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(lm).__name__} does not support it (transformers' "
                         f"supports_gradient_checkpointing is False); drop the key for this model")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x names it so; the old name warns
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def checkpoint_in_eval_mode(*lms):
    """For models trained in eval mode (the PPO family: no dropout, so the training forward matches the
    rollout's log-probs): transformers checkpoints a layer only when the layer itself is in training mode, so
    inside this context only the checkpointing layers' own flag is set (their dropout and attention submodules
    stay in eval mode), and it is put back after: a layer left in training mode would drop the KV cache of later
    no-grad passes in transformers 4.x, which does not look at grad mode."""
    layers = [m for lm in lms for m in lm.modules() if getattr(m, "gradient_checkpointing", False)]
    before = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before, strict=True):
            m.training = flag


def load_causal_lm(path: str, *, dtype: str = "float32", device: str | torch.device = "cpu", base: str | None = None,
                   lora: dict | None = None):
    """``AutoModelForCausalLM.from_pretrained`` from a local directory (never the network).

    A directory holding a LoRA adapter (a checkpoint of a LoRA run) loads as the model at ``base`` with that
    adapter injected, trainable; ``lora`` (``lora_settings(config)``) must agree with it.
    """
    from transformers import AutoModelForCausalLM

    from rlhf_engine.models.lora import is_adapter_dir, load_lora

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, found {dtype!r}")
    if os.path.isdir(path) and is_adapter_dir(path):
        if not base:
            raise ValueError(f"model: {path!r} holds a LoRA adapter, not a whole model: use the merged model its run "
                             f"wrote to output_dir/model (or load the adapter onto its base model: base=)")
        return load_lora(load_causal_lm(base, dtype=dtype, device=device), path, lora).to(device)
    _check_dir(path, "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], local_files_only=True,
                                                 **_attention_kwargs(path))
    return model.to(device)


def _attention_kwargs(path: str) -> dict:
    """transformers' SDPA attention drops the soft-capping of attention scores (Gemma 2's
    ``attn_logit_softcapping``), yet some versions (5.17) load such a model with it: the model trained would not
    be the one its config defines, nor the one the rollout samples from (its kernels apply the cap). Those models
    load with eager attention, which applies it (transformers 5.24 picks eager itself). NOTE: eager keeps each
    layer's [H, T, T] attention weights for the backward: gradient_checkpointing bounds that at long T."""
    from transformers import AutoConfig

    text = text_config(AutoConfig.from_pretrained(path, local_files_only=True))
    return {"attn_implementation": "eager"} if getattr(text, "attn_logit_softcapping", None) else {}


def prepare_lora(lm, config) -> bool:
    """Adds the LoRA adapters ``config``'s ``lora_*`` keys ask for to ``lm`` (in place) unless it carries them
    already (a resumed run's, or a model the caller adapted); True when ``lm`` trains through adapters."""
    from rlhf_engine.models.lora import add_lora, has_lora, lora_settings

    settings = lora_settings(config)
    if settings is not None and not has_lora(lm):
        add_lora(lm, **settings)
    return has_lora(lm)


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
