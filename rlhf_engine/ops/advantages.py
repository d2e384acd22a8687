"""Advantage estimators: GAE over a critic's values, outcome advantages of sample groups (GRPO, RLOO,
REINFORCE++ with a group baseline) and REINFORCE++'s whitened discounted returns. The GAE scan has a Triton kernel
(kernels/gae.py) and a native C++ twin (csrc/ppo_ops.cpp); the rest is a few vector ops.

Per-token tensors are ``[..., T]`` with a ``mask`` of the same shape (nonzero = a response token); outputs fp32.
"""

from __future__ import annotations

import torch

from rlhf_engine.ops import _dispatch
from rlhf_engine.ops._checks import check_choice, check_number, check_same_shape, float_mask, rows_2d
from rlhf_engine.ops.ppo import masked_whiten


def _gae_torch(rewards, values, mask, gamma, lam):
    n_rows, n_cols = rewards.shape
    r, v = rewards.float(), values.float()
    live = mask != 0
    advantages = torch.zeros((n_rows, n_cols), dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros(n_rows, dtype=torch.float32, device=rewards.device)
    last_gae = torch.zeros_like(next_value)
    for t in range(n_cols - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        gae_t = delta + gamma * lam * last_gae
        last_gae = torch.where(live[:, t], gae_t, last_gae)
        next_value = torch.where(live[:, t], v[:, t], next_value)
        advantages[:, t] = torch.where(live[:, t], gae_t, 0.0)
    returns = torch.where(live, advantages + v, 0.0)
    return advantages, returns


def _gae_native(rewards, values, mask, gamma, lam):
    from rlhf_engine import _C  # noqa: F401

    def f32(t):
        return t if t.dtype == torch.float32 else t.float()

    m = mask if mask.dtype in (torch.float32, torch.bool) else mask.float()
    return torch.ops.rlhf_engine.gae(f32(rewards), f32(values), m, gamma, lam)


def _gae_triton(rewards, values, mask, gamma, lam):
    from rlhf_engine.kernels import gae as kernels

    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return kernels.gae_forward(rewards, values, m, gamma, lam)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: rewards, values, mask [..., T] -> ``(advantages, returns)`` [..., T],
    fp32, no gradient.

    delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next, R_t = A_t + V_t, where "next" is the next
    unmasked position (0 after the last one). Masked positions are skipped (A = R = 0 there), so interior masked
    spans (e.g. tool output inside a response) neither contribute nor break the recursion.
    """
    op = "gae"
    check_same_shape(op, "rewards", rewards, values=values, mask=mask)
    gamma = check_number(op, "gamma", gamma, low=0.0, low_inclusive=True)
    lam = check_number(op, "lam", lam, low=0.0, low_inclusive=True)
    if gamma > 1.0 or lam > 1.0:
        raise ValueError(f"{op}: gamma and lam must lie in [0, 1], found gamma={gamma}, lam={lam}")
    shape = rewards.shape
    rows = [rows_2d(t) for t in (rewards, values, mask)]
    _, (advantages, returns) = _dispatch.run(
        op, tuple(rows), {"triton": _gae_triton, "native": _gae_native, "torch": _gae_torch}, *rows, gamma, lam
    )
    return advantages.view(shape), returns.view(shape)


def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, *,
                         whiten: bool = True) -> torch.Tensor:
    """REINFORCE++ advantages: discounted returns of per-token rewards, whitened over the batch's tokens.

    token_rewards [B, T] (typically the outcome score at each response's last token minus kl_coef * KL at every
    token), mask [B, T] (1 = response token) -> [B, T] fp32, 0 where masked:
        G_t = m_t r_t + gamma * G_{t+1}   (from the end of the row; masked rewards count as 0)
        A = masked_whiten(G, mask)        (``whiten=False``: G * mask)
    """
    op = "reinforce_pp_returns"
    if not isinstance(token_rewards, torch.Tensor) or token_rewards.dim() != 2:
        found = tuple(token_rewards.shape) if isinstance(token_rewards, torch.Tensor) else type(token_rewards).__name__
        raise ValueError(f"{op}: token_rewards must be a 2-D tensor [B, T], found {found}")
    if not isinstance(mask, torch.Tensor) or mask.shape != token_rewards.shape:
        found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{op}: mask must have the rewards' shape {tuple(token_rewards.shape)}, found {found}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{op}: gamma must be in [0, 1], found {gamma}")
    m = float_mask(mask)
    rewards = torch.where(m != 0, token_rewards.float(), 0.0)  # NaN padding included
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):  # NOTE: T steps of [B] vectors; T is a response length
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return masked_whiten(returns, m) if whiten else returns * m


def group_advantages(
    scores: torch.Tensor, group_size: int | None = None, *, index: torch.Tensor | None = None, kind: str = "grpo",
    norm_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Outcome advantages of samples grouped by prompt: ``group_size`` consecutive samples per group, or ``index``.

    scores [N] -> advantages [N] fp32, one per sequence (broadcast it over the response tokens:
    ``adv[:, None] * mask``). Groups: ``group_size`` (N a multiple of it, each group's samples adjacent), or
    ``index`` [N] (integer group ids in any order; groups of unequal sizes). For a group s_1..s_G:
        grpo: (s_i - mean(s)) / (std(s) + eps), std unbiased; s_i - mean(s) with ``norm_std=False``
        rloo: s_i - mean of the other G - 1 members
        reinforce++-baseline: s_i - mean(s), then whitened over all N: (d - mean(d)) / (std(d) + eps)
    A group of one has no baseline but itself: its advantage is 0 (before the whitening of reinforce++-baseline).
    """
    op = "group_advantages"
    check_choice(op, "kind", kind, ("grpo", "rloo", "reinforce++-baseline"))
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        found = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{op}: scores must be a 1-D tensor [N], found {found}")
    if (group_size is None) == (index is None):
        raise ValueError(f"{op}: pass exactly one of group_size (equal adjacent groups) or index (group ids)")
    s = scores.float()
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{op}: group_size must be a positive int, found {group_size!r}")
        if s.shape[0] % group_size:
            raise ValueError(f"{op}: group_size {group_size} does not divide the number of scores {s.shape[0]}")
        groups = torch.arange(s.shape[0], device=s.device) // group_size
        n_groups = s.shape[0] // group_size
    else:
        if not isinstance(index, torch.Tensor) or index.shape != s.shape or index.is_floating_point():
            found = (f"{tuple(index.shape)} {index.dtype}" if isinstance(index, torch.Tensor)
                     else type(index).__name__)
            raise ValueError(f"{op}: index must be an integer tensor of the scores' shape {tuple(s.shape)}, "
                             f"found {found}")
        ids, groups = torch.unique(index.to(s.device), return_inverse=True)
        n_groups = ids.numel()
    count = torch.zeros(n_groups, device=s.device).scatter_add_(0, groups, torch.ones_like(s))[groups]  # [N]
    total = torch.zeros(n_groups, device=s.device).scatter_add_(0, groups, s)[groups]  # [N]
    deviation = s - total / count
    if kind == "rloo":
        out = torch.where(count > 1, s - (total - s) / (count - 1).clamp(min=1), 0.0)
    elif kind == "grpo" and norm_std:
        squares = torch.zeros(n_groups, device=s.device).scatter_add_(0, groups, deviation**2)[groups]
        std = (squares / (count - 1).clamp(min=1)).sqrt()
        out = torch.where(count > 1, deviation / (std + eps), 0.0)
    else:
        out = deviation  # exactly 0 for a group of one
    if kind == "reinforce++-baseline" and out.numel() > 1:
        out = (out - out.mean()) / (out.std() + eps)
    return out
