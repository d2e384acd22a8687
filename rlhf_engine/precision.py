"""Mixed precision, one key for every phase: ``precision: fp32 | bf16 | fp16``.

- Trained models keep fp32 *master* weights, fp32 gradients and fp32 optimizer state; forward and backward run
  in the compute dtype (``torch.autocast``; under FSDP2 also ``MixedPrecisionPolicy(param_dtype=compute,
  reduce_dtype=fp32)``, so parameters are gathered in the compute dtype and gradients reduced in fp32). AdamW
  updates of ~lr * 1 land on fp32 weights, which bf16 weights (8 bits of mantissa) would round away.
- fp16 adds dynamic loss scaling (``LossScaler``): the loss is multiplied by a scale, gradients divided by it
  before clipping; an overflow skips the step and halves the scale, ``growth_interval`` clean steps double it.
- Frozen models (the reference policy, a reward model) need no master copy: they are held in the compute dtype.
- The rollout reads compute-dtype weights without a cast per decode step: under FSDP2 the gathered parameters
  are already in ``param_dtype``; otherwise ``RolloutWeights`` keeps a compute-dtype shadow of the policy,
  refreshed (one cast-copy) only when the master weights changed, i.e. at most once per optimizer step. Its cost
  is 2 bytes a parameter beside the 16 of fp32 weights + gradients + AdamW state.
- ``tf32`` (default on): fp32 matmuls on CUDA GPUs use TF32 tensor cores (torch's per-backend
  ``fp32_precision`` switches, the legacy ones before torch 2.9) while a trainer runs (``Trainer.fit``;
  ``PPOTrainer``'s ``train``, ``step``, ``rollout``, ``update``; the CLI sets it for its whole process).
"""

from __future__ import annotations

import contextlib
import copy

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_precision(owner: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}.precision must be one of {list(PRECISIONS)}, found {precision!r}")


def autocast(precision: str, device: torch.device):
    """Forward (and, through autograd, backward) in the compute dtype; a no-op for fp32."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


# NOTE: torch >= 2.9 has per-backend switches (``fp32_precision``: "tf32" / "ieee"); once one of them says "tf32"
# (transformers' ``enable_tf32`` sets them), reading the legacy ones raises, so where they exist only they are used.
_FP32_PRECISION = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _tf32_state() -> tuple:
    if _FP32_PRECISION:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


def _set_tf32_state(state: tuple) -> None:
    if _FP32_PRECISION:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state
    else:
        torch.set_float32_matmul_precision(state[0])
        torch.backends.cudnn.allow_tf32 = state[1]


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer; ignored by older GPUs), for the process."""
    if device.type != "cuda":
        return
    if _FP32_PRECISION:
        _set_tf32_state(("tf32", "tf32") if enabled else ("ieee", "ieee"))
    else:
        _set_tf32_state(("high", True) if enabled else ("highest", False))


@contextlib.contextmanager
def tf32(device: torch.device, enabled: bool):
    """``set_tf32`` while the block runs, the caller's settings restored after it: a trainer called from another
    program's process leaves that program's choice as it found it. torch's settings are process-wide, so other
    threads see them meanwhile. A no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    saved = _tf32_state()
    set_tf32(device, enabled)
    try:
        yield
    finally:
        _set_tf32_state(saved)


def fsdp_mixed_precision(precision: str):
    """The FSDP2 policy: parameters gathered in the compute dtype, gradients reduced in fp32 (None for fp32)."""
    if precision == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)


def frozen_copy(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A frozen, eval-mode copy of ``model`` in the compute dtype (a reference policy needs no fp32 master)."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return frozen if precision == "fp32" else frozen.to(DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16 (a fixed scale of 1 otherwise): multiply the loss by ``scale`` before the
    backward, call ``unscale_`` before clipping, then ``update(finite)``, which returns True when the step must
    be skipped for an overflow (the scale is halved; that is not a failure while the scale stays >= min_scale).
    """

    def __init__(self, precision: str, *, init_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 2.0**-14):
        self.enabled = precision == "fp16"
        self.scale = init_scale if self.enabled else 1.0
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0

    def unscale_(self, params) -> None:
        if not self.enabled:
            return
        inv = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)

    def update(self, finite: bool) -> bool:
        """Records one step; True when it overflowed and should be skipped (scale halved)."""
        if not self.enabled:
            return False
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale, self.good_steps = self.scale * 2.0, 0
            return False
        self.good_steps = 0
        if self.scale * 0.5 < self.min_scale:
            return False  # not an overflow any more: the caller's non-finite guard decides
        self.scale *= 0.5
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


class RolloutWeights:
    """The model the rollout reads: ``source`` itself in fp32 (or under FSDP, whose gathered parameters are
    already in the compute dtype), else a compute-dtype shadow copy refreshed by ``refresh()`` when the source's
    parameters changed (their version counters move on every optimizer step).

    A source with LoRA adapters gets a merged shadow: plain modules holding W + (alpha / r) B A, so the rollout
    runs no adapter layers (measured faster, ``benchmarks/bench_lora.py``), at the same 2 bytes a parameter."""

    def __init__(self, source: torch.nn.Module, precision: str, *, shadow: bool = True):
        from rlhf_engine.models.lora import has_lora, merge_plan, merged_copy

        self.source = source
        self._plan = None
        if shadow and precision != "fp32" and has_lora(source):
            self.model = merged_copy(source, DTYPES[precision])
            self._plan = merge_plan(self.model, source)
        else:
            self.model = frozen_copy(source, precision) if shadow and precision != "fp32" else source
        self._version = None
        if self._plan is not None:
            self._write_merged(lambda _: True)
        if self.is_shadow:
            self._version = self._source_version()

    def _source_version(self):
        return tuple(p._version for p in self.source.parameters())

    def _write_merged(self, changed_param) -> None:
        from rlhf_engine.models.lora import write_merged

        def changed(src) -> bool:  # a parameter, or a LoRA layer (changed when any of its parameters did)
            params = [src] if isinstance(src, torch.nn.Parameter) else list(src.parameters())
            return any(changed_param(p) for p in params)

        write_merged(self._plan, changed)

    @property
    def is_shadow(self) -> bool:
        return self.model is not self.source

    def shadow_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) if self.is_shadow else 0

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copies the master weights that changed into the shadow; True when it copied any.

        NOTE: per parameter, so a LoRA run (whose frozen base never moves) copies only its adapters."""
        if not self.is_shadow:
            return False
        version = self._source_version()
        if version == self._version:
            return False
        if self._plan is not None:
            moved = {id(p) for p, now, then in zip(self.source.parameters(), version, self._version, strict=True)
                     if now != then}
            self._write_merged(lambda p: id(p) in moved)
        else:
            for dst, src, now, then in zip(self.model.parameters(), self.source.parameters(), version,
                                           self._version, strict=True):
                if now != then:
                    dst.copy_(src)
        self._version = version
        return True
