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
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sums of ``values`` over ranks (a no-op in one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
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
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return DistInfo(strategy="none")
    if strategy == "none":
        raise ValueError(f"strategy: none in a run of {world} processes would train {world} unrelated models; "
                         f"use strategy: fsdp or ddp")
    return DistInfo(rank=rank, world_size=world, strategy="fsdp" if strategy == "auto" else strategy)


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


def wrap(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The module to train: FSDP2-sharded in place (one unit per block, plus the root), DDP-wrapped, or itself.

    Training code must call the returned module's ``forward`` (the hooks that gather parameters and reduce
    gradients hang there), never a submodule's.
    """
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(module):
            fully_shard(block)
        fully_shard(module)
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
