"""The PPO objective: KL estimators, the clipped policy loss (fused with its KL term), the value loss, GAE, group
advantages (GRPO / RLOO) and the masked helpers. Semantics: the README, "Using rlhf-engine inside another trainer".

Per-token tensors are ``[..., T]`` with a ``mask`` of the same shape (nonzero = a response token that counts);
leading dimensions are sequences. Inputs may be fp32, bf16 or fp16; the math runs in fp32; outputs are fp32.

Aggregation ``agg`` of a per-token loss L over sequences r and positions t:
    token-mean               sum(L m) / sum(m)
    seq-mean-token-sum       mean over counted sequences of sum_t(L m)
    seq-mean-token-mean      mean over counted sequences of sum_t(L m) / sum_t(m)
    seq-mean-token-sum-norm  sum(L m) / (R T)
A sequence without an unmasked token is not counted; a batch without one gives 0 (and zero gradients), never NaN.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.ops import _dispatch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "abs", "k2", "k3")
_KL_INDEX = {kind: i for i, kind in enumerate(KL_KINDS)}
# per-row partial sums of the fused policy loss, in this order
_S, _M, _CLIP, _AKL, _RSUM, _RMAX, _KL = range(7)
# NOTE: the PyTorch twin works on row chunks of about this many tokens so its temporaries stay small.
_CHUNK_TOKENS = 1 << 18


# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------
def _check_same_shape(op: str, reference_name: str, reference: torch.Tensor, **tensors) -> None:
    if not isinstance(reference, torch.Tensor) or not reference.dtype.is_floating_point:
        found = reference.dtype if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"{op}: {reference_name} must be a floating tensor, found {found}")
    if reference.dim() < 1:
        raise ValueError(f"{op}: {reference_name} must have shape [..., T], found a 0-dim tensor")
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, found {type(t).__name__}")
        if t.shape != reference.shape:
            raise ValueError(
                f"{op}: {name} shape {tuple(t.shape)} must equal {reference_name} shape {tuple(reference.shape)}"
            )
        if t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} on {reference.device}")


def _check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, found {value!r}")


def _check_number(op: str, name: str, value, *, low=None, low_inclusive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be a finite number, found {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{op}: {name} must be {'>=' if low_inclusive else '>'} {low}, found {value!r}")
    return float(value)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [R, T] contiguous."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.float32 else mask.float()


# ----------------------------------------------------------------------------------------------------------------
# masked helpers and aggregation
# ----------------------------------------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Masked mean: sum(values m) / sum(m) over ``dim`` (all dimensions by default), 0 where sum(m) == 0.

    values [...] (any floating dtype), mask [...] of the same shape (bool, integer or float weights; 0 = ignore).
    Returns fp32: a 0-dim tensor, or the shape of ``values`` without ``dim``. Masked values may be NaN or inf;
    they never reach the result. Differentiable w.r.t. values.
    """
    m = _float_mask(mask)
    weighted = torch.where(m != 0, values.float() * m, 0.0)
    total, count = (weighted.sum(), m.sum()) if dim is None else (weighted.sum(dim), m.sum(dim))
    return torch.where(count != 0, total / torch.where(count != 0, count, 1.0), 0.0)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whitening over the unmasked entries: (values - mean) / sqrt(var + eps), masked entries give 0.

    mean = masked_mean(values, mask) and var = sum((values - mean)^2 m) / (sum(m) - 1) (unbiased), both over all
    entries. values [...], mask [...] of the same shape; returns [...] fp32. With ``shift_mean=False`` the mean is
    added back (only the scale changes).
    """
    m = _float_mask(mask)
    x = torch.where(m != 0, values.float(), 0.0)
    mean = masked_mean(x, m)
    count = m.sum()
    var = torch.where(m != 0, (x - mean) ** 2 * m, 0.0).sum() / torch.clamp(count - 1, min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, 0.0)


def _row_weights(row_mask_sum: torch.Tensor, agg: str, n_cols: int) -> torch.Tensor:
    """Weight of each row's sum_t(L m) in the aggregated loss: loss = sum_r w_r sum_t(L m)."""
    n_rows = row_mask_sum.shape[0]
    counted = row_mask_sum != 0
    if agg == "token-mean":
        total = row_mask_sum.sum()
        return torch.where(total != 0, 1.0 / torch.where(total != 0, total, 1.0), 0.0).expand(n_rows)
    if agg == "seq-mean-token-sum-norm":
        return torch.full_like(row_mask_sum, 1.0 / max(1, n_rows * n_cols))
    n_counted = counted.sum().float()
    per_seq = torch.where(n_counted != 0, 1.0 / torch.clamp(n_counted, min=1.0), 0.0)
    if agg == "seq-mean-token-sum":
        return torch.where(counted, per_seq, 0.0)
    return torch.where(counted, per_seq / torch.where(counted, row_mask_sum, 1.0), 0.0)  # seq-mean-token-mean


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduces a per-token loss L [..., T] under ``mask`` m [..., T] to a 0-dim fp32 loss; with R sequences:

        token-mean               sum(L m) / sum(m)
        seq-mean-token-sum       mean over counted sequences of sum_t(L m)
        seq-mean-token-mean      mean over counted sequences of sum_t(L m) / sum_t(m)
        seq-mean-token-sum-norm  sum(L m) / (R T)

    A sequence without an unmasked token is not counted; an empty batch gives 0. Differentiable w.r.t. L; masked
    entries are ignored (even NaN).
    """
    _check_choice("aggregate_loss", "agg", agg, AGG_MODES)
    _check_same_shape("aggregate_loss", "per_token_loss", per_token_loss, mask=mask)
    m = _rows(_float_mask(mask))
    loss_rows = torch.where(m != 0, _rows(per_token_loss).float() * m, 0.0).sum(-1)
    return (loss_rows * _row_weights(m.sum(-1), agg, m.shape[-1])).sum()


# ----------------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------------
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

        k1  = logp - ref
        abs = |logp - ref|
        k2  = 0.5 (logp - ref)^2
        k3  = exp(d) - d - 1, d = ref - logp clamped to [-20, 20], result clamped to [-10, 10] (low variance)

    logp, ref_logp [...] of one shape (any floating dtype). Returns [...] fp32, differentiable w.r.t. both.
    Unmasked: multiply by the response mask, or reduce with ``masked_mean`` / ``aggregate_loss``.
    """
    _check_choice("kl_penalty", "kind", kind, KL_KINDS)
    _check_same_shape("kl_penalty", "logp", logp, ref_logp=ref_logp)
    diff = logp.float() - ref_logp.float()
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    d = torch.clamp(-diff, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


def _kl_and_grad_torch(logp: torch.Tensor, ref: torch.Tensor, kind: str):
    """KL estimate and its derivative w.r.t. logp, fp32 (the analytic twin of kernels/ppo_loss.py)."""
    diff = logp - ref
    if kind == "k1":
        return diff, torch.ones_like(diff)
    if kind == "abs":
        return diff.abs(), torch.sign(diff)
    if kind == "k2":
        return 0.5 * diff * diff, diff
    d_raw = -diff
    d = torch.clamp(d_raw, -20.0, 20.0)
    e = torch.exp(d)
    raw = e - d - 1.0
    live = (d_raw >= -20.0) & (d_raw <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
    return torch.clamp(raw, -10.0, 10.0), torch.where(live, 1.0 - e, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# the fused clipped policy loss: backends
# ----------------------------------------------------------------------------------------------------------------
def _policy_rows_torch(logp, old_logp, advantages, mask, ref_logp, ratio_low, ratio_high, dual_clip, kl_coef, kind):
    """[R, T] inputs -> (mask * dL/dlogp [R, T] fp32, partials [R, 7] fp32); chunked over rows."""
    n_rows, n_cols = logp.shape
    dloss = torch.empty((n_rows, n_cols), dtype=torch.float32, device=logp.device)
    partials = torch.empty((n_rows, 7), dtype=torch.float32, device=logp.device)
    step = max(1, _CHUNK_TOKENS // max(1, n_cols))
    for start in range(0, n_rows, step):
        rows = slice(start, min(n_rows, start + step))
        m = mask[rows].float()
        live = m != 0
        lp = torch.where(live, logp[rows].float(), 0.0)
        old = torch.where(live, old_logp[rows].float(), 0.0)
        adv = torch.where(live, advantages[rows].float(), 0.0)
        diff = lp - old
        ratio = torch.exp(torch.clamp(diff, -20.0, 20.0))
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, ratio_low, ratio_high)
        clipped = pg2 > pg1
        loss = torch.where(clipped, pg2, pg1)
        dl = torch.where(clipped, 0.0, pg1)  # d(-A ratio)/dlogp = -A ratio
        if dual_clip is not None:
            pg3 = -adv * dual_clip
            capped = (adv < 0) & (pg3 < loss)
            loss = torch.where(capped, pg3, loss)
            dl = torch.where(capped, 0.0, dl)
        dl = torch.where((diff >= -20.0) & (diff <= 20.0), dl, 0.0)
        out = partials[rows]
        if ref_logp is not None:
            kl, dkl = _kl_and_grad_torch(lp, torch.where(live, ref_logp[rows].float(), 0.0), kind)
            loss = loss + kl_coef * kl
            dl = dl + kl_coef * dkl
            out[:, _KL] = torch.where(live, kl * m, 0.0).sum(-1)
        else:
            out[:, _KL] = 0.0
        dloss[rows] = torch.where(live, dl * m, 0.0)
        out[:, _S] = torch.where(live, loss * m, 0.0).sum(-1)
        out[:, _M] = m.sum(-1)
        out[:, _CLIP] = torch.where(live & clipped, m, 0.0).sum(-1)
        out[:, _AKL] = torch.where(live, (old - lp) * m, 0.0).sum(-1)
        out[:, _RSUM] = torch.where(live, ratio * m, 0.0).sum(-1)
        out[:, _RMAX] = torch.where(live, ratio, -math.inf).amax(-1) if n_cols else -math.inf
    return dloss, partials


def _policy_rows_native(logp, old_logp, advantages, mask, ref_logp, ratio_low, ratio_high, dual_clip, kl_coef, kind):
    from rlhf_engine import _C  # noqa: F401  (registers torch.ops.rlhf_engine)

    def f32(t):
        return t if t.dtype == torch.float32 else t.float()

    m = mask if mask.dtype in (torch.float32, torch.bool) else mask.float()
    return torch.ops.rlhf_engine.ppo_policy_loss_fwd(
        f32(logp),
        f32(old_logp),
        f32(advantages),
        m,
        None if ref_logp is None else f32(ref_logp),
        ratio_low,
        ratio_high,
        -1.0 if dual_clip is None else dual_clip,
        kl_coef,
        _KL_INDEX[kind],
    )


def _policy_rows_triton(logp, old_logp, advantages, mask, ref_logp, ratio_low, ratio_high, dual_clip, kl_coef, kind):
    from rlhf_engine.kernels import ppo_loss as kernels

    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return kernels.ppo_policy_loss_forward(
        logp, old_logp, advantages, m, ref_logp, ratio_low, ratio_high, dual_clip, kl_coef, kind
    )


_POLICY_IMPLS = {"triton": _policy_rows_triton, "native": _policy_rows_native, "torch": _policy_rows_torch}


class _PPOPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, ratio_low, ratio_high, dual_clip, kl_coef, kind, agg):
        # all [R, T] contiguous
        tensors = tuple(t for t in (logp, old_logp, advantages, mask, ref_logp) if t is not None)
        _, (dloss, partials) = _dispatch.run(
            "ppo_policy_loss",
            tensors,
            _POLICY_IMPLS,
            logp,
            old_logp,
            advantages,
            mask,
            ref_logp,
            ratio_low,
            ratio_high,
            dual_clip,
            kl_coef,
            kind,
        )
        weights = _row_weights(partials[:, _M], agg, logp.shape[1])
        loss = (partials[:, _S] * weights).sum()
        ctx.save_for_backward(dloss, weights)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(partials)
        return loss, partials

    @staticmethod
    def backward(ctx, grad_loss, grad_partials):
        dloss, weights = ctx.saved_tensors
        # NOTE: the forward already holds mask * dL/dlogp: the backward is one scaling.
        grad_logp = (dloss * (weights * grad_loss)[:, None]).to(ctx.logp_dtype)
        return (grad_logp,) + (None,) * 10


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate (+ KL term), fused: returns ``(loss, stats)``.

    Shapes: logp, old_logp, advantages, mask (and ref_logp) [..., T], one shape; any floating dtype (the mask may
    be bool). ``loss`` is a 0-dim fp32 tensor.

    Per token: ratio = exp(logp - old_logp) (log-ratio clamped to [-20, 20]);
    L = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)); with ``dual_clip=c`` tokens with A < 0 are
    capped at -A c; plus ``kl_coef * kl_penalty(logp, ref_logp, kl_kind)`` when ``ref_logp`` is given. Then
    aggregated by ``agg`` (see the module docstring). Only ``logp`` receives a gradient: old_logp, advantages
    and ref_logp are constants of the objective.

    ``stats`` (0-dim fp32 tensors, no device sync): clipfrac, approx_kl = mean(old_logp - logp), ratio_mean,
    ratio_max, and kl_mean when ``ref_logp`` is given; all masked means over tokens.
    """
    op = "ppo_policy_loss"
    _check_same_shape(op, "logp", logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    clip_low = _check_number(op, "clip_low", clip_low, low=0.0)
    clip_high = clip_low if clip_high is None else _check_number(op, "clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        dual_clip = _check_number(op, "dual_clip", dual_clip, low=1.0)
    kl_coef = _check_number(op, "kl_coef", kl_coef)
    _check_choice(op, "kl_kind", kl_kind, KL_KINDS)
    _check_choice(op, "agg", agg, AGG_MODES)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"{op}: kl_coef={kl_coef} needs ref_logp (the reference model's log-probs)")
    rows = [_rows(t) if t is not None else None for t in (logp, old_logp, advantages, mask, ref_logp)]
    loss, partials = _PPOPolicyLossFunction.apply(
        *rows, 1.0 - clip_low, 1.0 + clip_high, dual_clip, kl_coef, kl_kind, agg
    )
    total = partials[:, _M].sum()
    inv_total = torch.where(total != 0, 1.0 / torch.where(total != 0, total, 1.0), 0.0)
    ratio_max = partials[:, _RMAX].amax() if partials.shape[0] else torch.tensor(-math.inf, device=logp.device)
    stats = {
        "clipfrac": partials[:, _CLIP].sum() * inv_total,
        "approx_kl": partials[:, _AKL].sum() * inv_total,
        "ratio_mean": partials[:, _RSUM].sum() * inv_total,
        "ratio_max": torch.where(torch.isfinite(ratio_max), ratio_max, 0.0),
    }
    if ref_logp is not None:
        stats["kl_mean"] = partials[:, _KL].sum() * inv_total
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# value loss
# ----------------------------------------------------------------------------------------------------------------
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss, aggregated by ``agg`` (see ``aggregate_loss``): returns ``(loss, stats)``.

    Per token: 0.5 max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2), or 0.5 (v - R)^2 without ``clip``.
    Shapes: values, old_values, returns, mask [..., T], one shape. ``loss`` is 0-dim fp32, differentiable w.r.t.
    values; stats (0-dim fp32): clipfrac (share of tokens where the clipped term is the larger), value_mean.
    """
    op = "value_loss"
    _check_same_shape(op, "values", values, old_values=old_values, returns=returns, mask=mask)
    _check_choice(op, "agg", agg, AGG_MODES)
    if clip is not None:
        clip = _check_number(op, "clip", clip, low=0.0)
    m = _float_mask(mask)
    live = m != 0
    v = torch.where(live, values.float(), 0.0)
    ret = torch.where(live, returns.float(), 0.0)
    unclipped = (v - ret).square()
    if clip is None:
        per_token = 0.5 * unclipped
        clipfrac = torch.zeros((), device=values.device)
    else:
        old = torch.where(live, old_values.float(), 0.0)
        clipped_v = old + torch.clamp(v - old, -clip, clip)
        clipped = (clipped_v - ret).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).float(), m)
    loss = aggregate_loss(per_token, m, agg)
    return loss, {"clipfrac": clipfrac, "value_mean": masked_mean(v.detach(), m)}


# ----------------------------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------------------------
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
    _check_same_shape(op, "rewards", rewards, values=values, mask=mask)
    gamma = _check_number(op, "gamma", gamma, low=0.0, low_inclusive=True)
    lam = _check_number(op, "lam", lam, low=0.0, low_inclusive=True)
    if gamma > 1.0 or lam > 1.0:
        raise ValueError(f"{op}: gamma and lam must lie in [0, 1], found gamma={gamma}, lam={lam}")
    shape = rewards.shape
    rows = [_rows(t) for t in (rewards, values, mask)]
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
    m = _float_mask(mask)
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
    _check_choice(op, "kind", kind, ("grpo", "rloo", "reinforce++-baseline"))
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
