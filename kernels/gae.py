"""Generalised advantage estimation: one program per row scans it backwards, skipping masked positions.

    delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   R_t = A_t + V_t

where "next" is the next *unmasked* position (V_next = A_next = 0 after the last one). A masked position gets
A = R = 0 and neither contributes nor breaks the recursion.
"""

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 65535


@triton.jit
def _gae_kernel(
    rewards_ptr,  # [R, T] any float dtype, contiguous
    values_ptr,  # [R, T]
    mask_ptr,  # [R, T] float or uint8
    advantages_ptr,  # [R, T] fp32 out
    returns_ptr,  # [R, T] fp32 out
    n_rows,
    n_cols,
    gamma,
    lam,
):
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    for row in range(pid, n_rows, n_programs):
        base = row * n_cols
        next_value = 0.0
        last_gae = 0.0
        for i in range(0, n_cols):
            t = n_cols - 1 - i
            live = tl.load(mask_ptr + base + t).to(tl.float32) != 0.0
            reward = tl.load(rewards_ptr + base + t).to(tl.float32)
            value = tl.load(values_ptr + base + t).to(tl.float32)
            delta = reward + gamma * next_value - value
            gae = delta + gamma * lam * last_gae
            # a masked position is skipped: it neither contributes nor breaks the recursion
            last_gae = tl.where(live, gae, last_gae)
            next_value = tl.where(live, value, next_value)
            tl.store(advantages_ptr + base + t, tl.where(live, gae, 0.0))
            tl.store(returns_ptr + base + t, tl.where(live, gae + value, 0.0))


def gae_forward(rewards, values, mask, gamma: float, lam: float):
    """All [R, T] contiguous (mask float or uint8). Returns (advantages, returns), fp32 [R, T]."""
    n_rows, n_cols = rewards.shape
    advantages = torch.empty((n_rows, n_cols), dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    grid = (max(1, min(n_rows, MAX_PROGRAMS)),)
    _gae_kernel[grid](rewards, values, mask, advantages, returns, n_rows, n_cols, gamma, lam, num_warps=1)
    return advantages, returns
