"""The PPO objective: KL estimators, the policy loss (fused with its KL term), the value loss and the masked
helpers; the advantage estimators are in ``rlhf_engine.ops.advantages``. Semantics: the README, "Using
rlhf-engine inside another trainer".

Per-token tensors are ``[..., T]`` with a ``mask`` of the same shape (nonzero = a response token that counts);
leading dimensions are sequences. Inputs may be fp32, bf16 or fp16; the math runs in fp32; outputs are fp32.

Aggregation ``agg`` of a per-token loss L over sequences r and positions t:
    token-mean               sum(L m) / sum(m)
    token-sum                sum(L m)
    seq-mean-token-sum       mean over counted sequences of sum_t(L m)
    seq-mean-token-mean      mean over counted sequences of sum_t(L m) / sum_t(m)
    seq-mean-token-sum-norm  sum(L m) / (R T)   (T: ``agg_norm`` where given)
A sequence without an unmasked token is not counted; a batch without one gives 0 (and zero gradients), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_engine.ops import _dispatch
from rlhf_engine.ops._checks import check_choice, check_number, check_same_shape, float_mask, rows_2d

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
POLICY_LOSSES = ("ppo", "gspo", "cispo", "sapo")
_PPO, _GSPO, _CISPO, _SAPO = range(4)  # indices of POLICY_LOSSES, as the kernels take them
KL_KINDS = ("k1", "abs", "k2", "k3")
_KL_INDEX = {kind: i for i, kind in enumerate(KL_KINDS)}
# per-row partial sums of the fused policy loss, in this order
_S, _M, _CLIP, _AKL, _RSUM, _RMAX, _KL = range(7)
# NOTE: the PyTorch twin works on row chunks of about this many tokens so its temporaries stay small.
_CHUNK_TOKENS = 1 << 18


# ----------------------------------------------------------------------------------------------------------------
# masked helpers and aggregation
# ----------------------------------------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Masked mean: sum(values m) / sum(m) over ``dim`` (all dimensions by default), 0 where sum(m) == 0.

    values [...] (any floating dtype), mask [...] of the same shape (bool, integer or float weights; 0 = ignore).
    Returns fp32: a 0-dim tensor, or the shape of ``values`` without ``dim``. Masked values may be NaN or inf;
    they never reach the result. Differentiable w.r.t. values.
    """
    m = float_mask(mask)
    weighted = torch.where(m != 0, values.float() * m, 0.0)
    total, count = (weighted.sum(), m.sum()) if dim is None else (weighted.sum(dim), m.sum(dim))
    return torch.where(count != 0, total / torch.where(count != 0, count, 1.0), 0.0)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[list[float]], list[float]] | None = None,
) -> torch.Tensor:
    """Whitening over the unmasked entries: (values - mean) / sqrt(var + eps), masked entries give 0.

    mean = masked_mean(values, mask) and var = sum((values - mean)^2 m) / (sum(m) - 1) (unbiased), both over all
    entries. values [...], mask [...] of the same shape; returns [...] fp32. With ``shift_mean=False`` the mean is
    added back (only the scale changes). ``all_reduce``: a callable summing a list of floats over the processes
    of a data-parallel group (``rlhf_engine.distributed.DistInfo.all_reduce``); the mean and variance are then
    those of every process's entries (two collectives, two host syncs).
    """
    m = float_mask(mask)
    x = torch.where(m != 0, values.float(), 0.0)
    total, count = torch.where(m != 0, x * m, 0.0).sum(), m.sum()
    if all_reduce is not None:
        total, count = (torch.tensor(v, device=x.device) for v in all_reduce([float(total), float(count)]))
    mean = torch.where(count != 0, total / torch.where(count != 0, count, 1.0), 0.0)
    squares = torch.where(m != 0, (x - mean) ** 2 * m, 0.0).sum()
    if all_reduce is not None:
        squares = torch.tensor(all_reduce([float(squares)])[0], device=x.device)
    var = squares / torch.clamp(count - 1, min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, 0.0)


def _row_weights(row_mask_sum: torch.Tensor, agg: str, n_cols: int, agg_norm: float | None = None) -> torch.Tensor:
    """Weight of each row's sum_t(L m) in the aggregated loss: loss = sum_r w_r sum_t(L m).

    A zero count gives a weight of 0, not 1 / 0 (nor 1 / tiny: the backward multiplies the weight by the upstream
    gradient, which a loss scale makes large, and 0 * inf would be NaN).
    """
    n_rows = row_mask_sum.shape[0]
    tiny = torch.finfo(torch.float32).tiny
    if agg == "token-mean":
        total = row_mask_sum.sum()
        return torch.where(total != 0, total.clamp(min=tiny).reciprocal(), 0.0).expand(n_rows)
    if agg == "token-sum":
        return torch.ones_like(row_mask_sum)
    if agg == "seq-mean-token-sum-norm":
        norm = n_cols if agg_norm is None else agg_norm
        return torch.full_like(row_mask_sum, 1.0 / (max(1, n_rows) * norm) if norm else 0.0)
    counted = (row_mask_sum != 0).float()
    per_seq = counted.sum().clamp(min=1.0).reciprocal() * counted
    if agg == "seq-mean-token-sum":
        return per_seq
    return torch.where(row_mask_sum != 0, per_seq / row_mask_sum.clamp(min=tiny), 0.0)  # seq-mean-token-mean


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", *,
                   agg_norm: float | None = None) -> torch.Tensor:
    """Reduces a per-token loss L [..., T] under ``mask`` m [..., T] to a 0-dim fp32 loss; with R sequences:

        token-mean               sum(L m) / sum(m)
        token-sum                sum(L m)
        seq-mean-token-sum       mean over counted sequences of sum_t(L m)
        seq-mean-token-mean      mean over counted sequences of sum_t(L m) / sum_t(m)
        seq-mean-token-sum-norm  sum(L m) / (R T), or sum(L m) / (R agg_norm) with ``agg_norm``

    A sequence without an unmasked token is not counted; an empty batch gives 0. Differentiable w.r.t. L; masked
    entries are ignored (even NaN).
    """
    op = "aggregate_loss"
    check_choice(op, "agg", agg, AGG_MODES)
    check_same_shape(op, "per_token_loss", per_token_loss, mask=mask)
    if agg_norm is not None:
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(f"{op}: agg_norm applies to agg='seq-mean-token-sum-norm' only, found agg={agg!r}")
        agg_norm = check_number(op, "agg_norm", agg_norm, low=0.0)
    m = rows_2d(float_mask(mask))
    loss_rows = torch.where(m != 0, rows_2d(per_token_loss).float() * m, 0.0).sum(-1)
    return (loss_rows * _row_weights(m.sum(-1), agg, m.shape[-1], agg_norm)).sum()


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
    check_choice("kl_penalty", "kind", kind, KL_KINDS)
    check_same_shape("kl_penalty", "logp", logp, ref_logp=ref_logp)
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
# the fused policy loss: backends
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PolicyParams:
    """The scalars of one call, as every backend takes them (``policy`` an index into POLICY_LOSSES)."""

    policy: int
    ratio_low: float
    ratio_high: float
    dual_clip: float | None
    kl_coef: float
    kl_kind: str
    tau_pos: float
    tau_neg: float


def _sapo_gate_torch(x: torch.Tensor):
    """sigmoid(x) and sigmoid(x) (1 - sigmoid(x)) = e / (1 + e)^2 with e = exp(-|x|): no overflow, and the
    derivative keeps its tiny tail where 1 - sigmoid(x) would round to 0 (kernels/ppo_loss.py computes the same)."""
    e = torch.exp(-x.abs().clamp(max=87.0))
    inv = 1.0 / (1.0 + e)
    return torch.where(x >= 0, inv, e * inv), e * inv * inv


def _policy_terms_torch(lp, old, adv, m, live, p: _PolicyParams):
    """Per-token (pg, d pg / d logp, clipped, ratio) of the policy term, fp32 [r, T]; masked entries arbitrary."""
    diff = lp - old
    in_range = (diff >= -20.0) & (diff <= 20.0)
    ratio = torch.exp(torch.clamp(diff, -20.0, 20.0))
    if p.policy == _GSPO:
        # the sequence ratio: exp of the row's mean log-ratio, clamped at 10 above; each token's gradient goes
        # through its own logp only (sg[s] exp(logp - sg[logp]))
        count = m.sum(-1, keepdim=True)
        mean = torch.where(live, diff * m, 0.0).sum(-1, keepdim=True) / torch.where(count != 0, count, 1.0)
        ratio = torch.exp(torch.clamp(mean, max=10.0)).expand_as(diff)
        in_range = (mean <= 10.0).expand_as(diff)
    if p.policy == _SAPO:
        tau = torch.where(adv > 0, p.tau_pos, p.tau_neg)
        gate, slope = _sapo_gate_torch(tau * (ratio - 1.0))
        pg = -adv * gate * (4.0 / tau)
        return pg, torch.where(in_range, -adv * 4.0 * slope * ratio, 0.0), torch.zeros_like(live), ratio
    weight = torch.clamp(ratio, p.ratio_low, p.ratio_high)
    if p.policy == _CISPO:  # -sg[clamp(ratio)] A logp: the clipped ratio is a constant weight
        clipped = (ratio < p.ratio_low) | (ratio > p.ratio_high)
        return -adv * weight * lp, -adv * weight, clipped, ratio
    pg1, pg2 = -adv * ratio, -adv * weight
    clipped = pg2 > pg1
    pg = torch.where(clipped, pg2, pg1)
    dpg = torch.where(clipped, 0.0, pg1)  # d(-A ratio)/dlogp = -A ratio
    if p.dual_clip is not None:
        pg3 = -adv * p.dual_clip
        capped = (adv < 0) & (pg3 < pg)
        pg = torch.where(capped, pg3, pg)
        dpg = torch.where(capped, 0.0, dpg)
    return pg, torch.where(in_range, dpg, 0.0), clipped, ratio


def _live(t: torch.Tensor, rows: slice, live: torch.Tensor) -> torch.Tensor:
    """fp32 rows of ``t``, 0 where masked (masked positions may hold anything, NaN included)."""
    return torch.where(live, t[rows].float(), 0.0)


def _policy_rows_torch(logp, old_logp, advantages, mask, ref_logp, is_weights, p: _PolicyParams):
    """[R, T] inputs -> (mask * dL/dlogp [R, T] fp32, partials [R, 7] fp32); chunked over rows."""
    n_rows, n_cols = logp.shape
    dloss = torch.empty((n_rows, n_cols), dtype=torch.float32, device=logp.device)
    partials = torch.empty((n_rows, 7), dtype=torch.float32, device=logp.device)
    step = max(1, _CHUNK_TOKENS // max(1, n_cols))
    for start in range(0, n_rows, step):
        rows = slice(start, min(n_rows, start + step))
        m = mask[rows].float()
        live = m != 0
        lp, old = _live(logp, rows, live), _live(old_logp, rows, live)
        loss, dl, clipped, ratio = _policy_terms_torch(lp, old, _live(advantages, rows, live), m, live, p)
        if is_weights is not None:
            w = _live(is_weights, rows, live)
            loss, dl = loss * w, dl * w
        out = partials[rows]
        if ref_logp is not None:
            kl, dkl = _kl_and_grad_torch(lp, _live(ref_logp, rows, live), p.kl_kind)
            loss = loss + p.kl_coef * kl
            dl = dl + p.kl_coef * dkl
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


def _f32(t):
    return t if t is None or t.dtype == torch.float32 else t.float()


def _policy_rows_native(logp, old_logp, advantages, mask, ref_logp, is_weights, p: _PolicyParams):
    from rlhf_engine import _C  # noqa: F401  (registers torch.ops.rlhf_engine)

    m = mask if mask.dtype in (torch.float32, torch.bool) else mask.float()
    return torch.ops.rlhf_engine.ppo_policy_loss_fwd(
        _f32(logp), _f32(old_logp), _f32(advantages), m, _f32(ref_logp), _f32(is_weights), p.policy, p.ratio_low,
        p.ratio_high, -1.0 if p.dual_clip is None else p.dual_clip, p.kl_coef, _KL_INDEX[p.kl_kind], p.tau_pos,
        p.tau_neg,
    )


def _policy_rows_triton(logp, old_logp, advantages, mask, ref_logp, is_weights, p: _PolicyParams):
    from rlhf_engine.kernels import ppo_loss as kernels

    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return kernels.ppo_policy_loss_forward(
        logp, old_logp, advantages, m, ref_logp, is_weights, p.policy, p.ratio_low, p.ratio_high, p.dual_clip,
        p.kl_coef, p.kl_kind, p.tau_pos, p.tau_neg,
    )


_POLICY_IMPLS = {"triton": _policy_rows_triton, "native": _policy_rows_native, "torch": _policy_rows_torch}


class _PPOPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, is_weights, params, agg, agg_norm):
        # all [R, T] contiguous
        tensors = tuple(t for t in (logp, old_logp, advantages, mask, ref_logp, is_weights) if t is not None)
        _, (dloss, partials) = _dispatch.run(
            "ppo_policy_loss", tensors, _POLICY_IMPLS, logp, old_logp, advantages, mask, ref_logp, is_weights, params
        )
        weights = _row_weights(partials[:, _M], agg, logp.shape[1], agg_norm)
        loss = torch.dot(partials[:, _S], weights)
        ctx.save_for_backward(dloss, weights)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(partials)
        return loss, partials

    @staticmethod
    def backward(ctx, grad_loss, grad_partials):
        dloss, weights = ctx.saved_tensors
        # NOTE: the forward already holds mask * dL/dlogp: the backward is one scaling.
        grad_logp = (dloss * (weights * grad_loss)[:, None]).to(ctx.logp_dtype)
        return (grad_logp,) + (None,) * 8


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    policy_loss: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    rollout_is_weights: torch.Tensor | None = None,
    agg: str | None = None,
    agg_norm: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A policy-gradient surrogate (+ KL term), fused: returns ``(loss, stats)``.

    Shapes: logp, old_logp, advantages, mask (and ref_logp, rollout_is_weights) [..., T], one shape; any floating
    dtype (the mask may be bool). ``loss`` is a 0-dim fp32 tensor. Only ``logp`` receives a gradient: old_logp,
    advantages, ref_logp and rollout_is_weights are constants of the objective; sg[.] below stops a gradient.

    Per token, with r = exp(logp - old_logp) (log-ratio clamped to [-20, 20]), lo = 1 - clip_low and
    hi = 1 + clip_high, the policy term P of ``policy_loss``:
        ppo   P = max(-A r, -A clamp(r, lo, hi)); with ``dual_clip=c``, tokens with A < 0 are capped at -A c
        gspo  (arXiv 2507.18071) the sequence ratio s = exp(min(10, sum_t m (logp - old_logp) / sum_t m)) of the
              row enters each token as s_t = sg[s] exp(logp - sg[logp]): P = max(-A s_t, -A clamp(s_t, lo, hi))
              (the advantages are per sequence, constant along a row)
        cispo (arXiv 2506.13585) P = -sg[clamp(r, lo, hi)] A logp
        sapo  (arXiv 2511.20347) P = -A f(r), f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = sapo_tau_pos where
              A > 0, else sapo_tau_neg
    L = w P + kl_coef * kl_penalty(logp, ref_logp, kl_kind), w = rollout_is_weights (1 without), then aggregated
    by ``agg`` (the module docstring); default: seq-mean-token-mean for gspo and sapo (as their papers and verl),
    token-mean for ppo and cispo. ``agg_norm`` replaces T in seq-mean-token-sum-norm (Dr. GRPO divides by a fixed
    maximum completion length, not the batch's padded width).

    ``stats`` (0-dim fp32 tensors, no device sync; masked means over tokens): approx_kl = mean(old_logp - logp),
    ratio_mean, ratio_max (of s for gspo, of r otherwise), clipfrac (share of tokens whose term is clipped: ppo,
    gspo; whose weight is clamped: cispo; sapo has no clip) and kl_mean when ``ref_logp`` is given.
    """
    op = "ppo_policy_loss"
    check_same_shape(op, "logp", logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                     rollout_is_weights=rollout_is_weights)
    check_choice(op, "policy_loss", policy_loss, POLICY_LOSSES)
    clip_low = check_number(op, "clip_low", clip_low, low=0.0)
    clip_high = clip_low if clip_high is None else check_number(op, "clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        if policy_loss != "ppo":
            raise ValueError(f"{op}: dual_clip applies to policy_loss='ppo' only, found policy_loss={policy_loss!r}")
        dual_clip = check_number(op, "dual_clip", dual_clip, low=1.0)
    kl_coef = check_number(op, "kl_coef", kl_coef)
    check_choice(op, "kl_kind", kl_kind, KL_KINDS)
    if agg is None:
        agg = "seq-mean-token-mean" if policy_loss in ("gspo", "sapo") else "token-mean"
    check_choice(op, "agg", agg, AGG_MODES)
    if agg_norm is not None:
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(f"{op}: agg_norm applies to agg='seq-mean-token-sum-norm' only, found agg={agg!r}")
        agg_norm = check_number(op, "agg_norm", agg_norm, low=0.0)
    tau_pos = check_number(op, "sapo_tau_pos", sapo_tau_pos, low=0.0)
    tau_neg = check_number(op, "sapo_tau_neg", sapo_tau_neg, low=0.0)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"{op}: kl_coef={kl_coef} needs ref_logp (the reference model's log-probs)")
    if rollout_is_weights is not None and not rollout_is_weights.dtype.is_floating_point:
        raise ValueError(f"{op}: rollout_is_weights must be a floating tensor, found {rollout_is_weights.dtype}")
    params = _PolicyParams(POLICY_LOSSES.index(policy_loss), 1.0 - clip_low, 1.0 + clip_high, dual_clip, kl_coef,
                           kl_kind, tau_pos, tau_neg)
    rows = [rows_2d(t) if t is not None else None
            for t in (logp, old_logp, advantages, mask, ref_logp, rollout_is_weights)]
    loss, partials = _PPOPolicyLossFunction.apply(*rows, params, agg, agg_norm)
    # NOTE: a handful of small ops on [R, 7] rather than one per statistic (they cost as much as the kernel at
    # 64 x 2048 on a CPU)
    sums = partials.sum(0)
    count = sums[_M]
    means = sums * torch.where(count != 0, count.reciprocal(), 0.0)
    # ratios are > 0: the clamp only turns the -inf of an all-masked batch into 0
    ratio_max = partials[:, _RMAX].amax().clamp(min=0.0) if partials.shape[0] else means[_RSUM] * 0.0
    stats = {"approx_kl": means[_AKL], "ratio_mean": means[_RSUM], "ratio_max": ratio_max}
    if policy_loss != "sapo":
        stats["clipfrac"] = means[_CLIP]
    if ref_logp is not None:
        stats["kl_mean"] = means[_KL]
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
    check_same_shape(op, "values", values, old_values=old_values, returns=returns, mask=mask)
    check_choice(op, "agg", agg, AGG_MODES)
    if clip is not None:
        clip = check_number(op, "clip", clip, low=0.0)
    m = float_mask(mask)
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
