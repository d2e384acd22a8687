"""Data parallelism on ``torch.distributed``: FSDP2 (``fully_shard``) or DDP for the trained models, gloo on CPU
and NCCL on CUDA, chosen automatically. No communication code of our own: process groups, collectives, sharding
and full state dicts all come from torch.

    torchrun --nproc-per-node 2 -m rlhf_engine.cli sft --config sft.yaml --strategy fsdp

How the phases use it:
- every rank draws the same *global* batch from the same seeded sampler and keeps rows ``rank::world``, so a run
  at world size W computes on the same global batch as at world size 1;
- losses are sums over a rank's tokens (or pairs) divided by the *global* count and multiplied by W, because
  DDP and FSDP average gradients over ranks: the result is the gradient of the mean over every token of the
  global batch, not a mean of per-rank means;
- metrics are all-reduced the same way and written by rank 0 only;
- checkpoints hold *full* (unsharded) model and optimizer state dicts keyed by parameter name, written by rank 0,
  so a checkpoint loads at any world size.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "none", "ddp", "fsdp")
_CREATED_GROUP = False  # init_distributed created the default process group (shutdown_distributed ends it)


def collective_device(backend: str) -> torch.device:
    """The device whose tensors the process group's backend reduces: CUDA for NCCL, else the CPU.

    NOTE: every collective of ours runs on tensors of this device rather than on a second, CPU-side (gloo)
    group beside NCCL: that works with any group a host trainer made (an NCCL-only one included), needs no
    second rendezvous, and costs one small host-device copy per call, which the trainers batch to a few a step.
    """
    backends = {part.split(":")[-1] for part in backend.lower().split(",")}
    if backends & {"nccl", "xccl"}:
        if not torch.cuda.is_available():
            raise RuntimeError(f"the process group's backend is {backend!r} but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    strategy: str = "none"
    device: torch.device = torch.device("cpu")  # where collectives run (``collective_device``)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sums of ``values`` over ranks, in one collective (a no-op in one process)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def reduce_stats(self, sums: dict[str, float], maxima: dict[str, float] | None = None) -> dict[str, float]:
        """Sums over ranks of ``sums`` and maxima over ranks of ``maxima``, in one collective (an all-gather of
        one row of floats per rank), whatever the number of keys."""
        maxima = maxima or {}
        if not self.enabled:
            return {**{k: float(v) for k, v in sums.items()}, **{k: float(v) for k, v in maxima.items()}}
        keys_s, keys_m = sorted(sums), sorted(maxima)
        row = torch.tensor([float(sums[k]) for k in keys_s] + [float(maxima[k]) for k in keys_m],
                           dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        table = torch.stack(rows)  # [world, keys]
        values = torch.cat([table[:, : len(keys_s)].sum(0), table[:, len(keys_s) :].amax(0)]).tolist()
        return dict(zip(keys_s + keys_m, values, strict=True))

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def shard(self, items: list) -> list:
        """This rank's share of a global list: ``items[rank::world]``; the list must divide evenly."""
        if len(items) % self.world_size:
            raise ValueError(f"a global batch of {len(items)} cannot be split over {self.world_size} processes: "
                             f"make the batch size a multiple of the world size")
        return items[self.rank :: self.world_size]


def init_distributed(strategy: str, device: torch.device) -> DistInfo:
    """Joins the process group that torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...), if any."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, found {strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return DistInfo(strategy="none")
    if not dist.is_initialized():
        global _CREATED_GROUP
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        _CREATED_GROUP = True
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return DistInfo(strategy="none")
    if strategy == "none":
        raise ValueError(f"strategy: none in a run of {world} processes would train {world} unrelated models; "
                         f"use strategy: fsdp or ddp")
    return DistInfo(rank=rank, world_size=world, strategy="fsdp" if strategy == "auto" else strategy,
                    device=collective_device(str(dist.get_backend())))


def shutdown_distributed() -> bool:
    """Ends the process group ``init_distributed`` created (every rank calls it; a no-op otherwise); returns
    whether there was one. A group made by the caller is the caller's to end."""
    if not (_CREATED_GROUP and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


def ran_process_group() -> bool:
    """Whether ``init_distributed`` created a process group in this process (ended or not)."""
    return _CREATED_GROUP


def exit_process(status: int):
    """Ends a process that has run a process group: output flushed, then ``os._exit`` without interpreter
    teardown.

    NOTE: why not a plain return. ``destroy_process_group`` does not join the backend's threads (gloo's run loops,
    the TCPStore's event loop): torch.distributed.tensor keeps the FSDP DeviceMesh, and through it the group,
    alive in its caches, so those threads run until the interpreter's own teardown destroys the group. That
    destructor then races the finalising interpreter (a thread that touches Python state is stopped by a forced
    unwind) and the process dies of SIGABRT, "terminate called without an active exception", after a run that
    succeeded. Nothing is left to tear down once the run's files are closed and its output flushed, so the
    process ends there. Only entry points call this (the CLI, spawned workers), never library code.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def local_device(device: torch.device) -> torch.device:
    """cuda:LOCAL_RANK under torchrun on GPUs, else ``device``."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a transformers model (each becomes one FSDP unit)."""
    for name in ("layers", "h", "blocks"):
        for sub in module.modules():
            blocks = getattr(sub, name, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
                return list(blocks)
    return []


def wrap(module: torch.nn.Module, info: DistInfo, *, mixed_precision=None) -> torch.nn.Module:
    """The module to train: FSDP2-sharded in place (one unit per block, plus the root), DDP-wrapped, or itself.

    ``mixed_precision``: an FSDP2 ``MixedPrecisionPolicy`` (``precision.fsdp_mixed_precision``); DDP and one
    process run the fp32 module under autocast instead. Training code must call the returned module's
    ``forward`` (the hooks that gather parameters and reduce gradients hang there), never a submodule's.
    """
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        kwargs = {} if mixed_precision is None else {"mp_policy": mixed_precision}
        for block in _blocks(module):
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        return module
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def gathered(module: torch.nn.Module):
    """Inside, every FSDP-sharded parameter of ``module`` is whole (plain tensors, as in one process): the
    rollout engine reads them in place; they are resharded, and the copies freed, on exit."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in unwrap(module).modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield unwrap(module)
    finally:
        for unit in units:
            unit.reshard()


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def hook_free_view(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` as it computes in one process, for use inside ``gathered``: every FSDP2 unit in it replaced by a
    shallow copy of its original class without FSDP's hooks, sharing the unit's parameter and buffer dicts (into
    which ``unshard`` registers the whole parameters). So the model's own forward runs on the gathered weights
    with no all-gather per layer: a collective that ranks running different numbers of rollout steps could not
    join. Modules holding no FSDP unit are shared as they are (an unsharded model is its own view)."""
    from collections import OrderedDict

    from torch.distributed.fsdp import FSDPModule

    def has_unit(m) -> bool:
        return any(isinstance(x, FSDPModule) for x in m.modules())

    def view(m):
        if not has_unit(m):
            return m
        copy_ = object.__new__(type(m))
        copy_.__dict__.update(m.__dict__)  # the same _parameters / _buffers dicts: unshard's writes show through
        copy_.__dict__["_modules"] = OrderedDict((name, view(child)) for name, child in m._modules.items())
        if isinstance(m, FSDPModule):
            copy_.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
            for name in _HOOK_DICTS:
                if name in copy_.__dict__:
                    copy_.__dict__[name] = OrderedDict()
        return copy_

    return view(module)


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """``(model_state, optimizer_state)`` unsharded and keyed by parameter name, on CPU (on rank 0 only when
    distributed; every rank must call this). The optimizer state loads at any world size."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    module = unwrap(module)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    optim_state = get_optimizer_state_dict(module, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of ``full_state`` for the optimizer, at this run's world size and sharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(module), optimizer, state, options=StateDictOptions(full_state_dict=True))


class SavesState:
    """Something with ``save_pretrained(path)`` that writes ``model`` with an already gathered full state dict."""

    def __init__(self, model, state_dict: dict):
        self.model, self.state_dict = unwrap(model), state_dict

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict)
