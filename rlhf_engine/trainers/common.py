"""What the SFT, reward-model and DPO phases share: the config fields every phase has, the optimizer and schedule,
and one training loop with gradient accumulation, mixed precision, clipping, a non-finite guard, metrics, periodic
evaluation, atomic checkpoints and exact resume.

The loop normalises by the whole accumulation window: each phase's ``loss_fn`` returns *sums* (over tokens for
SFT, over pairs for the reward model and DPO) and ``weight_fn`` the count they are summed over, so the gradient is
that of the mean over every token (or pair) of the window, never a mean of micro-batch means.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass, field

import torch

from rlhf_engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint_state, save_checkpoint
from rlhf_engine.data.readers import KEY_FIELDS
from rlhf_engine.distributed import STRATEGIES, DistInfo, SavesState, full_state, load_optimizer_state, wrap
from rlhf_engine.metrics import METRICS_FILE, MetricsLogger
from rlhf_engine.models.loading import enable_gradient_checkpointing, max_positions, prepare_lora
from rlhf_engine.precision import LossScaler, autocast, check_precision, fsdp_mixed_precision, tf32

SCHEDULES = ("cosine", "linear", "constant")


def option(default, help: str):
    """A config field with its documentation (shown by ``rlhf-engine <phase> --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _positive_int(cls: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}.{name} must be an int >= {minimum}, found {value!r}")


@dataclass
class RunConfig:
    """Fields every phase has (the offline phases through ``TrainConfig``, PPO/GRPO/RLOO through ``PPOConfig``)."""

    model: str = option("", "Hugging Face model directory to start from (required by the CLI)")
    data: str = option("", "training data: JSONL, Parquet, CSV or a datasets directory (required by the CLI)")
    tokenizer: str = option("", "tokenizer directory (default: the model's own)")
    prompt_key: str = option("", "the data's column holding the prompt (default: prompt)")
    response_key: str = option("", "SFT: the data's column holding the response (default: response)")
    messages_key: str = option("", "SFT: the data's column holding chat messages (default: messages)")
    chosen_key: str = option("", "rm/dpo: the data's column holding the chosen response (default: chosen)")
    rejected_key: str = option("", "rm/dpo: the data's column holding the rejected response (default: rejected)")
    output_dir: str = option("", "where metrics.jsonl, checkpoints/ and the final model/ go (required by the CLI)")
    seed: int = option(0, "seed of the data order, initialisation and sampling")
    precision: str = option("fp32", "fp32 | bf16 | fp16: forward and backward in that dtype, fp32 master weights, "
                                     "gradients and optimizer state; fp16 adds dynamic loss scaling")
    tf32: bool = option(True, "TF32 tensor cores for fp32 matmuls on CUDA GPUs that have them, while the run "
                              "trains (the caller's setting restored after it)")
    device: str = option("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    save_every: int = option(0, "checkpoint every this many steps (0: only at the end)")
    save_total_limit: int = option(2, "complete checkpoints kept (oldest removed first)")
    resume: bool = option(False, "continue from the last complete checkpoint in output_dir")
    tensorboard: bool = option(False, "also write TensorBoard events to output_dir/tensorboard")
    strategy: str = option("auto", "data parallelism under torchrun: fsdp (FSDP2) | ddp | none | auto (fsdp with "
                                    "more than one process)")
    gradient_checkpointing: bool = option(False, "recompute each decoder layer in the backward instead of keeping "
                                                 "its activations (transformers' own): less memory, ~1/3 more "
                                                 "compute")
    lora_r: int = option(0, "LoRA rank (peft): train low-rank adapters on the frozen model instead of every weight; "
                            "the reference policy is the model with its adapters disabled; 0: off")
    lora_alpha: float = option(16.0, "LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_r")
    lora_dropout: float = option(0.0, "dropout on the adapters' input (sft, rm, dpo; the PPO family trains without "
                                      "dropout)")
    lora_target_modules: list[str] = option(["all-linear"], "modules that get adapters: names such as q_proj,v_proj, "
                                                            "or all-linear (every Linear of the body, not the LM "
                                                            "head)")
    stop_after_steps: int = option(0, "end this process after this many steps (PPO: iterations), checkpoint "
                                      "written (to split a run over jobs with a time limit; continue with resume); "
                                      "0: run to the end")

    def __post_init__(self):
        cls = type(self).__name__
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{cls}.strategy must be one of {list(STRATEGIES)}, found {self.strategy!r}")
        check_precision(cls, self.precision)
        _positive_int(cls, "save_every", self.save_every, minimum=0)
        _positive_int(cls, "save_total_limit", self.save_total_limit)
        _positive_int(cls, "stop_after_steps", self.stop_after_steps, minimum=0)
        _positive_int(cls, "lora_r", self.lora_r, minimum=0)
        if self.lora_r:
            if not self.lora_alpha > 0:
                raise ValueError(f"{cls}.lora_alpha must be > 0, found {self.lora_alpha!r}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"{cls}.lora_dropout must be in [0, 1), found {self.lora_dropout!r}")
            targets = list(self.lora_target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets) or (
                    "all-linear" in targets and len(targets) > 1):
                raise ValueError(f"{cls}.lora_target_modules must be module names (q_proj,v_proj) or all-linear, "
                                 f"found {self.lora_target_modules!r}")
            if importlib.util.find_spec("peft") is None:
                raise ValueError(f"{cls}.lora_r > 0 needs the peft package, which is not installed: pip install "
                                 f"peft (into this environment: {sys.executable} -m pip install peft), or set "
                                 f"lora_r: 0")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(f"{cls}.tensorboard: true needs the tensorboard package, which is not installed: "
                             f"pip install tensorboard (into this environment: {sys.executable} -m pip install "
                             f"tensorboard), or drop the key")

    # keys of earlier releases: naming one is an error that names its replacement
    RENAMED_KEYS = {"dtype": "precision: fp32 | bf16 | fp16 (weights stay fp32; compute runs in that dtype)",
                    "bf16": "precision: bf16"}

    def data_keys(self) -> dict:
        """Our field names -> the data's column names, for the ``*_key`` fields that are set."""
        return {name: getattr(self, f"{name}_key") for name in KEY_FIELDS if getattr(self, f"{name}_key")}

    def require(self, *names: str) -> None:
        """The CLI's check that the run's paths are set: names the missing field and how to set it."""
        for name in names:
            if not getattr(self, name):
                raise ValueError(f"{type(self).__name__}.{name} is required: set `{name}:` in the YAML file or "
                                 f"pass --{name.replace('_', '-')} VALUE")


@dataclass
class TrainConfig(RunConfig):
    """Fields every offline phase (SFT, reward model, DPO) has."""

    eval_data: str = option("", "held-out data of the same kind, any of the same formats (optional)")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(32, "examples per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch_size * grad_accum)")
    lr: float = option(2e-5, "peak learning rate (AdamW)")
    schedule: str = option("cosine", "learning-rate schedule after warmup: cosine | linear | constant")
    warmup_steps: int = option(20, "linear warmup steps")
    min_lr_ratio: float = option(0.1, "the schedule's final learning rate as a fraction of lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple[float, ...] = option((0.9, 0.999), "AdamW betas")
    max_grad_norm: float = option(1.0, "gradient-norm clipping threshold")
    max_length: int = option(512, "tokens per sequence; the prompt is kept whole and the response cut to fit")
    skip_nonfinite: bool = option(True, "skip an optimizer step whose loss or gradient is not finite")
    max_skipped_steps: int = option(10, "abort after this many consecutive skipped steps")
    log_every: int = option(1, "write a metrics row every this many steps")
    eval_every: int = option(0, "evaluate on eval_data every this many steps (0: only at the end)")

    def __post_init__(self):
        super().__post_init__()
        cls = type(self).__name__
        for name in ("steps", "batch_size", "grad_accum", "max_length", "log_every", "max_skipped_steps"):
            _positive_int(cls, name, getattr(self, name))
        for name in ("warmup_steps", "eval_every"):
            _positive_int(cls, name, getattr(self, name), minimum=0)
        if not self.lr > 0:
            raise ValueError(f"{cls}.lr must be > 0, found {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{cls}.schedule must be one of {list(SCHEDULES)}, found {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{cls}.min_lr_ratio must be in [0, 1], found {self.min_lr_ratio!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"{cls}.max_grad_norm must be > 0, found {self.max_grad_norm!r}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"{cls}.adam_betas must be two numbers in [0, 1), found {self.adam_betas!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but torch sees no CUDA device; use device: cpu or auto")
    return device


def lr_factor(config: TrainConfig, steps: int | None = None):
    """Linear warmup to 1, then ``schedule`` down to ``min_lr_ratio`` at the last step."""
    total = config.steps if steps is None else steps

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
        if config.schedule == "constant":
            return 1.0
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape

    return factor


def resume_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint a run continues from (``resume``), or None for a fresh run.

    A fresh run into an ``output_dir`` that already holds checkpoints is an error rather than a silent overwrite.
    """
    if not config.output_dir:
        return None
    if config.resume:
        path = latest_checkpoint(config.output_dir)
        if path is None:
            print(f"resume: no complete checkpoint in {config.output_dir}/checkpoints; starting from step 0")
        return path
    if list_checkpoints(config.output_dir):
        raise ValueError(f"output_dir {config.output_dir!r} already holds checkpoints of an earlier run: pass "
                         f"--resume true to continue it, or choose another output_dir")
    return None


def with_config_tf32(run):
    """A trainer's run method, under its ``config.tf32`` on its ``device`` (``precision.tf32``: the caller's
    setting restored afterwards)."""

    @functools.wraps(run)
    def wrapped(self, *args, **kwargs):
        with tf32(self.device, self.config.tf32):
            return run(self, *args, **kwargs)

    return wrapped


def open_metrics(config: RunConfig, dist: DistInfo, resume_step: int | None) -> MetricsLogger | None:
    """The run's metrics.jsonl (cut back to ``resume_step`` when resuming); rank 0 only, None without output_dir."""
    if not config.output_dir or not dist.is_main:
        return None
    tb = os.path.join(config.output_dir, "tensorboard") if config.tensorboard else None
    return MetricsLogger(os.path.join(config.output_dir, METRICS_FILE), resume_step=resume_step, tensorboard_dir=tb)


class Trainer:
    """The loop shared by the offline phases.

    ``module`` is the trained root (a ``CausalLMLogprobs`` or ``ScalarHeadModel``); with ``dist`` it is sharded
    (FSDP2) or replicated (DDP) here, and every forward in ``loss_fn`` must go through ``trainer.module``.
    ``save_as`` names the model directory inside each checkpoint.
    """

    def __init__(self, config: TrainConfig, phase: str, module: torch.nn.Module, *, save_as: str = "policy",
                 tokenizer=None, dist: DistInfo | None = None, progress: bool = True):
        self.config = config
        self.phase = phase
        self.dist = dist or DistInfo()
        self.root = module
        prepare_lora(module.lm, config)  # CausalLMLogprobs and ScalarHeadModel both hold the LM as .lm
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{phase}: the model has no trainable parameters")
        limit = max_positions(module)
        if limit is not None and config.max_length > limit:
            raise ValueError(f"{type(config).__name__}.max_length = {config.max_length} is above the model's "
                             f"max_position_embeddings = {limit} (positions past it were never trained): set "
                             f"max_length <= {limit}")
        self.device = next(module.parameters()).device
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(module.lm)
        self.module = wrap(module, self.dist, mixed_precision=fsdp_mixed_precision(config.precision))
        self.scaler = LossScaler(config.precision)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.save_as = save_as
        self.tokenizer = tokenizer
        self.progress = progress and self.dist.is_main
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=tuple(config.adam_betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config))
        self.rng = random.Random(config.seed)  # the same on every rank: every rank draws the same global batch
        self.step = 0
        self.skipped_in_a_row = 0

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """``(model_state, trainer_state)``, both full (unsharded) and keyed by name; a collective call."""
        model_state, optim_state = full_state(self.module, self.optimizer)
        return model_state, {"optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                             "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(), "step": self.step,
                             "skipped_in_a_row": self.skipped_in_a_row, "world_size": self.dist.world_size,
                             "loss_scale": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Optimizer, schedule, sampler and RNG state (the weights were loaded into the model before wrapping)."""
        load_optimizer_state(self.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
        self.scaler.load_state_dict(state.get("loss_scale"))

    def save(self) -> str | None:
        model_state, state = self.state_dict()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.config.output_dir, self.step,
                                   models={self.save_as: SavesState(self.root, model_state)}, state=state,
                                   meta={"phase": self.phase, "world_size": self.dist.world_size},
                                   keep=self.config.save_total_limit, tokenizer=self.tokenizer)
        self.dist.barrier()
        return path

    # -- the loop ------------------------------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.config.precision, self.device)

    @with_config_tf32
    def fit(self, sample, collate, loss_fn, weight_fn, *, evaluate=None, resume_from: str | None = None,
            on_step=None, weight_name: str = "examples") -> list[dict]:
        """Runs to ``config.steps``; returns the metrics rows (those of this process, after any resume).

        sample(rng) -> the global micro-batch as a list (every rank draws the same one); collate(this rank's
        share of it) -> batch; loss_fn(batch) -> dict of sums over the batch ("loss" with grad);
        weight_fn(batch) -> the count those sums are over; evaluate() -> dict of held-out metrics (optional).
        """
        from rlhf_engine.progress import progress_bar

        cfg = self.config
        if resume_from is not None:
            _, state = load_checkpoint_state(resume_from)
            self.load_state_dict(state)
        logger = open_metrics(cfg, self.dist, self.step if resume_from else None)
        history = []
        bar = progress_bar(cfg.steps, initial=self.step, desc=self.phase, enabled=self.progress)
        end = min(cfg.steps, self.step + cfg.stop_after_steps) if cfg.stop_after_steps else cfg.steps
        try:
            while self.step < end:
                micro = [collate(self.dist.shard(sample(self.rng))) for _ in range(cfg.grad_accum)]
                row = self._one_step(micro, loss_fn, weight_fn, weight_name)
                self.step += 1
                last = self.step == cfg.steps
                if evaluate is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    row.update({f"eval_{k}": v for k, v in evaluate().items()})
                if self.step % cfg.log_every == 0 or last or any(k.startswith("eval_") for k in row):
                    history.append(row)
                    if logger is not None:
                        logger.log(row)
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "accuracy") if k in row})
                if on_step is not None:
                    on_step(row)
                if cfg.output_dir and ((cfg.save_every and self.step % cfg.save_every == 0) or self.step == end):
                    self.save()
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        return history

    def _one_step(self, micro: list, loss_fn, weight_fn, weight_name: str) -> dict:
        cfg = self.config
        world = self.dist.world_size
        (total,) = self.dist.all_reduce([sum(weight_fn(b) for b in micro)])
        sums: dict[str, float] = {}
        finite = True
        for batch in micro:
            with self.autocast():
                out = loss_fn(batch)
            # NOTE: DDP/FSDP average gradients over ranks, hence the factor world: the result is the gradient of
            # (sum over every rank's tokens) / (global count), whatever the world size.
            loss = out["loss"] * (world / max(total, 1))
            finite = finite and bool(torch.isfinite(loss))
            (loss * self.scaler.scale).backward()  # even when not finite: every rank joins the reduction
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
        self.scaler.unscale_(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        keys = sorted(sums)
        *reduced, n_finite = self.dist.all_reduce([sums[k] for k in keys] + [float(finite)])
        finite = n_finite == world and math.isfinite(grad_norm)
        row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0]}
        overflow = self.scaler.update(finite)  # fp16: an overflow halves the scale and skips, it is no failure
        if self.scaler.enabled:
            row["loss_scale"] = self.scaler.scale
        if finite:
            self.optimizer.step()
            self.skipped_in_a_row = 0
        elif overflow:
            row["skipped"] = 1
        else:
            if not cfg.skip_nonfinite:
                raise FloatingPointError(f"{self.phase} step {self.step}: the loss or gradient is not finite; "
                                         f"lower lr, enable max_grad_norm, or set skip_nonfinite: true")
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= cfg.max_skipped_steps:
                raise FloatingPointError(f"{self.phase}: {self.skipped_in_a_row} steps in a row had a non-finite "
                                         f"loss or gradient; lower lr or check the data")
            row["skipped"] = 1
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule; torch warns about that
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        row.update({k: v / max(total, 1) for k, v in zip(keys, reduced, strict=True)})
        row.update({"grad_norm": grad_norm, weight_name: int(total)})
        return row


def move(batch, device):
    """A dataclass of tensors (or None) moved to ``device``."""
    return type(batch)(*(None if t is None else t.to(device) for t in
                         (getattr(batch, f.name) for f in dataclasses.fields(batch))))
