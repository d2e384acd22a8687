"""The phases as the CLI runs them: config in, a trained model directory out.

Each ``run_<phase>(config)`` checks the run's paths, loads the model(s) (from the last checkpoint when resuming),
reads and validates the JSONL data, trains with metrics and checkpoints under ``output_dir``, saves the final
model as a Hugging Face directory in ``output_dir/model`` (with the tokenizer, so it is the next phase's
``model``), then prints a summary table and writes ``summary.json`` and ``curves.png`` beside it. A LoRA run
(``lora_r > 0``) checkpoints only its adapter, saves the adapter as trained in ``output_dir/adapter`` (peft's
format) and the merged model in ``output_dir/model``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time

import torch

from rlhf_engine.checkpoint import copy_model_atomic, latest_checkpoint
from rlhf_engine.config import config_to_dict
from rlhf_engine.data.readers import read_data
from rlhf_engine.distributed import DistInfo, init_distributed, local_device
from rlhf_engine.metrics import METRICS_FILE, fmt, format_table, plot_curves, read_metrics
from rlhf_engine.models import load_causal_lm, load_tokenizer
from rlhf_engine.models.heads import HEAD_CONFIG, HEAD_FILE, ScalarHeadModel
from rlhf_engine.models.lora import copy_adapter, export_merged, is_adapter_dir, lora_settings
from rlhf_engine.precision import DTYPE_NAMES, set_tf32
from rlhf_engine.trainers.common import resolve_device, resume_checkpoint

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"  # LoRA runs: the PEFT adapter as trained (MODEL_DIR holds the merged model)


def _start(config, phase: str) -> tuple[torch.device, str | None, DistInfo]:
    config.require("model", "data", "output_dir")
    device = local_device(resolve_device(config.device))
    set_tf32(device, config.tf32)
    dist = init_distributed(config.strategy, device)
    resume = resume_checkpoint(config)
    dist.barrier()  # every rank has looked for checkpoints before rank 0 can write one
    if dist.is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, f"{phase}_config.json"), "w") as f:
            json.dump({**config_to_dict(config), "world_size": dist.world_size, "strategy": dist.strategy}, f,
                      indent=1)
    torch.manual_seed(config.seed)  # the same on every rank: new heads start identical everywhere
    return device, resume, dist


def check_vocab(tokenizer, model, what: str = "model") -> None:
    """Token ids the tokenizer can produce must index the model's embedding: a mismatch is an error, not a crash
    (or, on GPU, a silent out-of-bounds read) in the middle of training."""
    lm = getattr(model, "lm", model)
    rows = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the {what}'s embedding has {rows} rows: "
                         f"ids >= {rows} would be out of range; use the model's own tokenizer or resize its "
                         f"embeddings (model.resize_token_embeddings(len(tokenizer))) and save it")


def _finish(config, phase: str, keys: list[str], extra: dict, seconds: float, dist: DistInfo,
            saved: str = "policy") -> dict:
    """The final model (the last checkpoint's, already gathered whole) and the summary of the whole run
    (metrics.jsonl holds the rows from before a resume too); rank 0 only."""
    if not dist.is_main:
        return {}
    last_checkpoint = os.path.join(latest_checkpoint(config.output_dir), saved)
    if is_adapter_dir(last_checkpoint):  # LoRA: the merged model for the next phase, and the adapter as trained
        export_merged(config.model, last_checkpoint, os.path.join(config.output_dir, MODEL_DIR))
        copy_adapter(last_checkpoint, os.path.join(config.output_dir, ADAPTER_DIR), extra=(HEAD_FILE, HEAD_CONFIG))
    else:
        copy_model_atomic(last_checkpoint, os.path.join(config.output_dir, MODEL_DIR))
    history = read_metrics(os.path.join(config.output_dir, METRICS_FILE))
    keys = keys + sorted({k for r in history for k in r if k.startswith("eval_")})
    last = history[-1] if history else {}
    summary = {"phase": phase, "steps": last.get("step", -1) + 1, **{k: last[k] for k in keys if k in last},
               **extra, "seconds": round(seconds, 1), "model": os.path.join(config.output_dir, MODEL_DIR)}
    if is_adapter_dir(last_checkpoint):
        summary["adapter"] = os.path.join(config.output_dir, ADAPTER_DIR)
    with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    png = plot_curves(history, keys, os.path.join(config.output_dir, "curves.png"), title=phase)
    print("\n" + format_table([(k, fmt(v)) for k, v in summary.items()]))
    print(f"wrote {config.output_dir}/metrics.jsonl, summary.json" + (", curves.png" if png else ""))
    return summary


def _check_resume_kind(config, path: str) -> None:
    """A checkpoint of a full fine-tune resumed with lora_r > 0 (an adapter resumed with lora_r 0 is load_lora's)."""
    if config.lora_r and not is_adapter_dir(path):
        raise ValueError(f"lora_r: {path!r} is a checkpoint of full fine-tuning but the config's lora_r is "
                         f"{config.lora_r}: resume with the run's own lora_* values (lora_r: 0)")


def _load_policy(config, resume: str | None, device, tokenizer):
    """The trained causal LM: from the checkpoint being resumed, else from ``config.model``; vocabulary checked."""
    # trained: fp32 master weights whatever the precision (the compute dtype comes from autocast / FSDP's policy)
    # (a LoRA run's checkpoint holds the adapter: it loads onto config.model)
    if resume:
        _check_resume_kind(config, os.path.join(resume, "policy"))
    policy = load_causal_lm(os.path.join(resume, "policy") if resume else config.model, device=device,
                            base=config.model, lora=lora_settings(config))
    check_vocab(tokenizer, policy)
    return policy


def _read_data(config, kind: str) -> tuple[list, list | None]:
    """The training records and, when ``eval_data`` is set, the held-out ones (validated, same format)."""
    keys = config.data_keys()
    return (read_data(config.data, kind, keys),
            read_data(config.eval_data, kind, keys) if config.eval_data else None)


def run_sft(config, *, progress: bool = True) -> dict:
    from rlhf_engine.trainers.sft import train_sft

    t0 = time.perf_counter()
    device, resume, dist = _start(config, "sft")
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = _load_policy(config, resume, device, tokenizer)
    records, eval_records = _read_data(config, "sft")
    train_sft(model, tokenizer, records, config, progress=progress, eval_examples=eval_records, resume_from=resume,
              dist=dist)
    return _finish(config, "sft", ["loss", "grad_norm", "lr"],
                   {"examples": len(records)}, time.perf_counter() - t0, dist)


def run_reward(config, *, progress: bool = True) -> dict:
    from rlhf_engine.trainers.reward import train_reward_model

    t0 = time.perf_counter()
    device, resume, dist = _start(config, "reward")
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    source = os.path.join(resume, "reward_model") if resume else config.model
    if resume:
        _check_resume_kind(config, source)
    model = ScalarHeadModel.from_pretrained(source, device=device, init_head=True, base=config.model,
                                            lora=lora_settings(config))
    check_vocab(tokenizer, model)
    pairs, eval_pairs = _read_data(config, "preferences")
    train_reward_model(model, tokenizer, pairs, config, progress=progress, eval_pairs=eval_pairs, resume_from=resume,
                       dist=dist)
    return _finish(config, "reward", ["loss", "accuracy", "reward_margin"],
                   {"pairs": len(pairs)}, time.perf_counter() - t0, dist, "reward_model")


def run_dpo(config, *, progress: bool = True) -> dict:
    from rlhf_engine.trainers.dpo import train_dpo

    t0 = time.perf_counter()
    device, resume, dist = _start(config, "dpo")
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    policy = _load_policy(config, resume, device, tokenizer)
    frozen = DTYPE_NAMES[config.precision]  # frozen models need no fp32 master: held in the compute dtype
    reference = None  # LoRA: the policy with its adapters disabled
    if config.ref_model or not config.lora_r:
        reference = load_causal_lm(config.ref_model or config.model, dtype=frozen, device=device)
        check_vocab(tokenizer, reference, "reference model")
    pairs, eval_pairs = _read_data(config, "preferences")
    train_dpo(policy, tokenizer, pairs, config, reference=reference, progress=progress, eval_pairs=eval_pairs,
              resume_from=resume, dist=dist)
    return _finish(config, "dpo", ["loss", "accuracy", "reward_margin"],
                   {"pairs": len(pairs)}, time.perf_counter() - t0, dist)


def load_reward_fn(spec: str):
    """``'package.module:function'`` or ``'path/to/file.py:function'`` -> the callable."""
    if ":" not in spec:
        raise ValueError(f"reward_fn must look like 'module:function' or 'file.py:function', found {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"reward_fn: no such file {module_name!r}")
        spec_obj = importlib.util.spec_from_file_location("rlhf_engine_user_reward", module_name)
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward_fn: {module_name!r} has no callable {attr!r}")
    return fn


def run_ppo(config, *, progress: bool = True) -> dict:
    from rlhf_engine.trainers.ppo import PPOTrainer

    t0 = time.perf_counter()
    device, resume, dist = _start(config, config.algorithm)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    policy = _load_policy(config, resume, device, tokenizer)
    frozen = DTYPE_NAMES[config.precision]  # frozen models need no fp32 master: held in the compute dtype
    reference = load_causal_lm(config.model, dtype=frozen, device=device) if resume and not config.lora_r else None
    reward_model = reward_fn = critic = None
    if config.reward_fn:
        reward_fn = load_reward_fn(config.reward_fn)
    else:
        reward_model = ScalarHeadModel.from_pretrained(config.reward_model, dtype=frozen, device=device)
        reward_model.requires_grad_(False)
        check_vocab(tokenizer, reward_model, "reward model")
    if config.algorithm == "ppo":
        base = config.critic_model or config.reward_model or config.model
        critic = ScalarHeadModel.from_pretrained(os.path.join(resume, "critic") if resume else base, device=device,
                                                 init_head=True, base=base, lora=lora_settings(config))
    prompts = read_data(config.data, "prompts", config.data_keys())  # records: other fields reach reward_fn
    trainer = PPOTrainer(policy, tokenizer, config, reward_model=reward_model, reward_fn=reward_fn, critic=critic,
                         reference=reference, dist=dist)
    trainer.train(prompts, progress=progress, resume_from=resume)
    keys = ["reward_mean", "kl", "policy_loss", "entropy", "response_length", "value_loss"]
    return _finish(config, config.algorithm, keys, {"prompts": len(prompts)}, time.perf_counter() - t0, dist)


