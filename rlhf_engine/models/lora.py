"""LoRA adapters through peft, injected in place into the transformers model.

    lm = load_causal_lm("sft/model")
    add_lora(lm, r=16, alpha=32)            # peft's LoRA layers replace the targeted Linear modules, in place
    with adapters_disabled(lm):             # the base model: the frozen reference of DPO and the PPO family
        ref_logits = lm(input_ids).logits

The model keeps its own class (``LlamaForCausalLM``...), so everything that takes a causal LM takes it as it
is: the fused log-prob module, the rollout (which calls the model's own modules, LoRA layers included), FSDP2
and DDP. Only the adapters require grad, so the optimizers (built over ``requires_grad`` parameters) hold only
them. ``save_adapter`` writes peft's format (``adapter_config.json``, ``adapter_model.safetensors``), which
``peft.PeftModel.from_pretrained`` loads; ``export_merged`` writes the merged model as a plain Hugging Face
directory, what the next phase reads.

NOTE: transformers' own adapter methods (``model.add_adapter``...) would do the same but require a newer peft
than some environments have (transformers 5.24 wants peft >= 0.22); peft's ``inject_adapter_in_model`` is the
seam both use, and works from peft 0.13.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import warnings

import torch

ADAPTER = "default"  # peft's name for a model's one adapter
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SETTINGS_FILE = "lora_settings.json"  # the run's lora_* keys as given, checked on resume
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_PEFT_PREFIX = "base_model.model."  # peft's key prefix in adapter files (the PeftModel -> LoraModel -> model path)


def _peft():
    try:
        import peft
    except ModuleNotFoundError as err:
        if err.name != "peft":  # peft is there but fails to import: that error, not "not installed"
            raise
        raise ImportError("lora_r > 0 needs the peft package, which is not installed: pip install peft (or drop "
                          "the lora_* keys)") from None
    return peft


def _tuner_layers(lm) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(lm) -> bool:
    """Whether ``lm`` carries peft adapters injected in place (by ``add_lora`` or ``load_lora``); adapters of
    another name than peft's default (several, or a renamed one) are refused, naming them."""
    names = list(getattr(lm, "peft_config", None) or {})
    if names and names != [ADAPTER]:
        raise ValueError(f"{type(lm).__name__} carries the adapters {names}: rlhf-engine trains one adapter named "
                         f"{ADAPTER!r}; merge or delete the others first")
    return bool(names)


TRAINED_ADAPTERS_ERROR = (
    "{who}: the policy carries LoRA adapters trained before (some lora_B != 0), so with them disabled it is the "
    "base model, not the policy as it starts: pass reference= (e.g. rlhf_engine.precision.frozen_copy(policy, "
    "precision)), or merge the adapters into the weights and start new ones")


def trained_adapters(lm) -> bool:
    """Whether ``lm``'s adapters differ from their start (some B != 0): with them disabled it is not itself."""
    return any("lora_B" in name and bool(p.detach().ne(0).any()) for name, p in lm.named_parameters())


def unwrap_peft(model):
    """A ``peft.PeftModel`` (what ``get_peft_model`` returns) -> the transformers model inside it, adapters in
    place; anything else as it is. The trainers take either."""
    if type(model).__name__.startswith("PeftModel") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def lora_settings(config) -> dict | None:
    """The ``lora_*`` keys of a run config as ``add_lora`` keywords; None when ``lora_r`` is 0 (off)."""
    if not getattr(config, "lora_r", 0):
        return None
    return {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": list(config.lora_target_modules)}


def _peft_targets(target_modules: list[str]):
    return "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)


def add_lora(lm, *, r: int, alpha: float, dropout: float = 0.0, target_modules=("all-linear",)):
    """Injects LoRA adapters (rank ``r``, scale ``alpha / r``) into ``lm``'s targeted Linear modules, in place;
    the base weights are frozen and B starts at zero, so the adapted model starts equal to the base. Returns ``lm``.

    ``target_modules``: module names (the last part: ``q_proj``, ``c_attn``...) or ``["all-linear"]`` (every
    Linear of the body; never the LM head).
    """
    peft = _peft()
    # GPT-2's projections are transformers' Conv1D ([in, out] weights): peft needs fan_in_fan_out for them
    conv1d = any(type(m).__name__ == "Conv1D" for m in lm.modules())
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=_peft_targets(target_modules),
                             bias="none", fan_in_fan_out=conv1d,
                             base_model_name_or_path=getattr(lm, "name_or_path", None) or None)
    _inject(lm, config, "lora_target_modules")
    lm._rlhf_lora_settings = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules)}
    return lm


def _inject(lm, config, what: str):
    peft = _peft()
    if has_lora(lm):
        raise ValueError(f"{type(lm).__name__} already carries a LoRA adapter; add one adapter per model")
    try:
        peft.inject_adapter_in_model(config, lm, adapter_name=ADAPTER)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(f"{what}: {err} ({type(lm).__name__}'s linear modules: {', '.join(linear)}; or use "
                         f"all-linear)") from None
    if not _tuner_layers(lm):
        raise ValueError(f"{what}: no module of {type(lm).__name__} was adapted")
    names: dict[int, list[str]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for layer in _tuner_layers(lm):
        shared = names.get(id(layer.get_base_layer().weight), [])
        if len(shared) > 1:  # a tied LM head / embedding: one weight, two modules, only one of them adapted
            raise ValueError(f"{what}: {shared[0]} is tied to {shared[1]} (one weight for both): adapting one of "
                             f"them is not supported; leave it out of lora_target_modules")
    return lm


@contextlib.contextmanager
def adapters_disabled(lm):
    """Inside, ``lm`` computes its base model (every LoRA layer bypassed); the adapters are back after."""
    layers = _tuner_layers(lm)
    if not layers:
        raise ValueError(f"adapters_disabled: {type(lm).__name__} has no adapters")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield lm
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def as_reference(lm):
    """Inside, ``lm`` is the frozen reference policy: its base model, in eval mode (no dropout, as a frozen copy
    would be); its adapters and training mode are back after."""
    was_training = lm.training
    lm.eval()
    try:
        with adapters_disabled(lm):
            yield lm
    finally:
        lm.train(was_training)


def merged_copy(lm, dtype: torch.dtype):
    """A frozen, eval-mode copy of ``lm`` in ``dtype`` with no adapter layers: each adapted module is its base
    module again, whose weights ``write_merged`` sets to the merged ones (the rollout's shadow, see
    ``precision.RolloutWeights``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    shadow = copy.deepcopy(lm).eval().requires_grad_(False)
    for name, module in list(shadow.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(shadow.get_submodule(parent), child, module.get_base_layer())
    shadow.__dict__.pop("peft_config", None)
    return shadow.to(dtype)


def merge_plan(shadow, lm) -> list:
    """``(shadow parameter, source)`` for every parameter of ``merged_copy(lm)``: the source is ``lm``'s parameter
    of the same name, or, for an adapted module's weight, the LoRA layer whose merged weight it holds."""
    modules = dict(lm.named_modules())
    tuners = {id(layer) for layer in _tuner_layers(lm)}
    adapted = {name for name, module in modules.items() if id(module) in tuners}
    plan = []
    for name, p in shadow.named_parameters():
        owner, _, attr = name.rpartition(".")
        if owner in adapted:
            base = modules[owner].get_base_layer()
            plan.append((p, modules[owner] if attr == "weight" else getattr(base, attr)))
        else:
            plan.append((p, lm.get_parameter(name)))
    return plan


@torch.no_grad()
def write_merged(plan: list, changed) -> None:
    """Updates the shadow from its plan: a merged weight W + (alpha / r) B A wherever ``changed(layer)``, a copy
    of each other parameter where ``changed(parameter)``."""
    for dst, src in plan:
        if isinstance(src, torch.nn.Parameter):
            if changed(src):
                dst.copy_(src)
        elif changed(src):
            base = src.get_base_layer().weight
            dst.copy_(base + src.get_delta_weight(ADAPTER).to(base.dtype))


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_adapter(lm, path: str, state_dict: dict | None = None) -> None:
    """``lm``'s adapter in peft's format under ``path``; ``state_dict`` (of ``lm``, already gathered whole, as
    under FSDP) replaces the live weights."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = get_peft_model_state_dict(lm, state_dict=state_dict, adapter_name=ADAPTER)
    tensors = {_PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    lm.peft_config[ADAPTER].save_pretrained(path)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    settings = getattr(lm, "_rlhf_lora_settings", None)
    if settings is not None:
        with open(os.path.join(path, SETTINGS_FILE), "w") as f:
            json.dump(settings, f)


def load_lora(lm, path: str, settings: dict | None = None):
    """Injects the adapter saved at ``path`` (``save_adapter``'s directory) into ``lm`` and loads its weights,
    trainable; ``settings`` (``lora_settings(config)``) must agree with the saved adapter's rank, alpha and
    dropout. Returns ``lm``."""
    peft = _peft()
    from safetensors.torch import load_file

    saved = peft.LoraConfig.from_pretrained(path)
    if settings is None:
        raise ValueError(f"lora_r: {path!r} holds a LoRA adapter but the config's lora_r is 0: resume with the run's "
                         f"own lora_* values")
    for key, field, mine in (("r", "lora_r", settings["r"]), ("lora_alpha", "lora_alpha", settings["alpha"]),
                             ("lora_dropout", "lora_dropout", settings["dropout"])):
        if float(getattr(saved, key)) != float(mine):
            raise ValueError(f"{field}: the adapter at {path!r} has {key} = {getattr(saved, key)} but the config "
                             f"says {mine}; use the run's own lora_* values to resume it")
    recorded = dict(settings)
    if os.path.isfile(os.path.join(path, SETTINGS_FILE)):
        with open(os.path.join(path, SETTINGS_FILE)) as f:
            recorded = {**json.load(f), **{k: v for k, v in settings.items() if k != "target_modules"}}
        targets, mine = recorded["target_modules"], settings.get("target_modules")
        if mine is not None and list(targets) != list(mine):
            raise ValueError(f"lora_target_modules: the adapter at {path!r} was trained on {targets} but the config "
                             f"says {mine}; use the run's own lora_* values to resume it")
    saved.inference_mode = False
    _inject(lm, saved, f"adapter at {path!r}")
    if "target_modules" in recorded:  # what a checkpoint of the resumed run records again
        lm._rlhf_lora_settings = recorded
    weights = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(os.path.join(path, WEIGHTS_FILE)).items()}
    result = peft.set_peft_model_state_dict(lm, weights, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter at {path!r} does not fit {type(lm).__name__}: missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]}")
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)
    return lm


def export_merged(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """``adapter_dir`` merged into the base model at ``base_dir``, written to ``out_dir`` as a plain Hugging Face
    directory (fp32, as trained); the other files of ``adapter_dir`` (the tokenizer, a scalar head) are copied
    beside it. Written into a temporary directory and renamed into place."""
    peft = _peft()
    from rlhf_engine.checkpoint import atomic_dir
    from rlhf_engine.models.loading import load_causal_lm

    base = load_causal_lm(base_dir)
    with warnings.catch_warnings():  # peft reads an attribute transformers 5 renamed: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = peft.PeftModel.from_pretrained(base, adapter_dir, adapter_name=ADAPTER).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        for name in os.listdir(adapter_dir):
            source = os.path.join(adapter_dir, name)
            if (name not in (*ADAPTER_FILES, SETTINGS_FILE) and os.path.isfile(source)
                    and not os.path.exists(os.path.join(tmp, name))):
                shutil.copy2(source, os.path.join(tmp, name))
        with open(os.path.join(tmp, "lora_merged.json"), "w") as f:  # provenance, for a reader of the directory
            json.dump({"base_model": os.path.abspath(base_dir), "adapter": os.path.abspath(adapter_dir)}, f,
                      indent=1)
    return out_dir


def copy_adapter(adapter_dir: str, out_dir: str, extra: tuple[str, ...] = ()) -> str:
    """The adapter files of ``adapter_dir`` and those of ``extra`` it has (a reward model's head) copied to
    ``out_dir``, through a temporary directory and a rename."""
    from rlhf_engine.checkpoint import atomic_dir

    with atomic_dir(out_dir) as tmp:
        for name in (*ADAPTER_FILES, *extra):
            if os.path.isfile(os.path.join(adapter_dir, name)):
                shutil.copy2(os.path.join(adapter_dir, name), os.path.join(tmp, name))
    return out_dir
