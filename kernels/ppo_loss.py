"""The policy loss with its KL term, fused: one pass over [R, T] computes, per token (d = logp - old_logp,
r = exp(clamp(d, -20, 20)), lo / hi the ratio bounds, w the rollout IS weight, 1 without):

    ppo    P = max(-A r, -A clamp(r, lo, hi)),  then min(P, -A dual_clip) where A < 0 with a dual clip
    gspo   the row's ratio s = exp(min(10, sum m d / sum m)) (a first pass over the row), P as ppo with s for r
           and no dual clip; the gradient reaches each token through its own logp (d s_t / d logp_t = s)
    cispo  P = -sg[clamp(r, lo, hi)] A logp
    sapo   P = -A f(r), f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg
    L      = w P + kl_coef * kl(logp, ref_logp)      with a reference
    dL     = d L / d logp                            (analytic; clamps pass no gradient outside their range)

stores ``mask * dL`` (the backward only scales it by the aggregation weight of its row) and, per row, the partial
sums every aggregation mode and statistic needs: [sum L m, sum m, sum clipped m, sum (old - logp) m,
sum ratio m, max ratio over m > 0, sum kl m] (the ratio is s for gspo). Masked positions contribute exactly 0,
whatever they hold.
"""

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 65535
NUM_PARTIALS = 7  # S, M, clipped, approx_kl, ratio_sum, ratio_max, kl_sum
KL_KINDS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
PPO, GSPO, CISPO, SAPO = 0, 1, 2, 3  # the indices of rlhf_engine.ops.ppo.POLICY_LOSSES


@triton.jit
def _kl_and_grad(logp, ref, KL_KIND: tl.constexpr):
    """Per-token KL estimator (k1, abs, k2, k3 as rlhf_engine.ops.kl_penalty) and its derivative w.r.t. logp (fp32
    in, fp32 out)."""
    if KL_KIND == 0:  # k1
        kl = logp - ref
        dkl = tl.full(logp.shape, 1.0, tl.float32)
    elif KL_KIND == 1:  # abs
        diff = logp - ref
        kl = tl.abs(diff)
        dkl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KL_KIND == 2:  # k2
        diff = logp - ref
        kl = 0.5 * diff * diff
        dkl = diff
    else:  # k3 (low-variance KL): exp(d) - d - 1, d = ref - logp clamped to [-20, 20], result to [-10, 10]
        d_raw = ref - logp
        d = tl.minimum(tl.maximum(d_raw, -20.0), 20.0)
        e = tl.exp(d)
        raw = e - d - 1.0
        kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
        live = (d_raw >= -20.0) & (d_raw <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
        dkl = tl.where(live, 1.0 - e, 0.0)
    return kl, dkl


@triton.jit
def _policy_term(logp, old, adv, seq_ratio, seq_in_range, ratio_low, ratio_high, dual_clip, tau_pos, tau_neg,
                 POLICY: tl.constexpr, DUAL_CLIP: tl.constexpr):
    """(P, dP/dlogp, clipped, ratio) per token; ``seq_ratio`` is the row's GSPO ratio and ``seq_in_range`` 1.0
    while its log is below the clamp at 10 (both unused by the other kinds)."""
    diff = logp - old
    in_range = (diff >= -20.0) & (diff <= 20.0)
    ratio = tl.exp(tl.minimum(tl.maximum(diff, -20.0), 20.0))
    if POLICY == 1:  # gspo: the row's ratio for every token, no gradient once its log is clamped at 10
        ratio = tl.zeros_like(diff) + seq_ratio
        in_range = (tl.zeros_like(diff) + seq_in_range) != 0.0
    if POLICY == 3:  # sapo: sigmoid and its derivative e / (1 + e)^2 from e = exp(-|x|), which cannot overflow
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        x = tau * (ratio - 1.0)
        e = tl.exp(-tl.minimum(tl.abs(x), 87.0))
        inv = 1.0 / (1.0 + e)
        gate = tl.where(x >= 0.0, inv, e * inv)
        term = -adv * gate * (4.0 / tau)
        dterm = tl.where(in_range, -adv * 4.0 * e * inv * inv * ratio, 0.0)
        clipped = tl.zeros_like(diff) != 0.0
    else:
        weight = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        if POLICY == 2:  # cispo: the clamped ratio is a constant weight on -A logp
            term = -adv * weight * logp
            dterm = -adv * weight
            clipped = (ratio < ratio_low) | (ratio > ratio_high)
        else:
            pg1 = -adv * ratio
            pg2 = -adv * weight
            clipped = pg2 > pg1
            term = tl.where(clipped, pg2, pg1)
            dterm = tl.where(clipped, 0.0, pg1)  # d(-A ratio)/dlogp = -A ratio
            if DUAL_CLIP:
                pg3 = -adv * dual_clip
                capped = (adv < 0.0) & (pg3 < term)
                term = tl.where(capped, pg3, term)
                dterm = tl.where(capped, 0.0, dterm)
            dterm = tl.where(in_range, dterm, 0.0)
    return term, dterm, clipped, ratio


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logp_ptr,  # [R, T] fp32/bf16/fp16, contiguous
    old_logp_ptr,  # [R, T]
    advantages_ptr,  # [R, T]
    mask_ptr,  # [R, T] float or uint8 (bool viewed as uint8)
    ref_logp_ptr,  # [R, T] (read only when HAS_REF)
    weights_ptr,  # [R, T] rollout IS weights (read only when HAS_WEIGHTS)
    dloss_ptr,  # [R, T] fp32 out: mask * dL/dlogp
    partials_ptr,  # [R, NUM_PARTIALS] fp32 out
    n_rows,
    n_cols,
    ratio_low,
    ratio_high,
    dual_clip,
    kl_coef,
    tau_pos,
    tau_neg,
    POLICY: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    KL_KIND: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    for row in range(pid, n_rows, n_programs):
        base = row * n_cols
        seq_ratio = 0.0
        seq_in_range = 0.0
        if POLICY == 1:  # gspo: a first pass for the row's mean log-ratio
            acc_diff = tl.zeros([BLOCK_T], dtype=tl.float32)
            acc_m = tl.zeros([BLOCK_T], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_T):
                cols = start + tl.arange(0, BLOCK_T)
                in_row = cols < n_cols
                m = tl.load(mask_ptr + base + cols, mask=in_row, other=0).to(tl.float32)
                logp = tl.load(logp_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32)
                old = tl.load(old_logp_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32)
                acc_diff += tl.where(m != 0.0, (logp - old) * m, 0.0)
                acc_m += m
            count = tl.sum(acc_m, axis=0)
            mean = tl.sum(acc_diff, axis=0) / tl.where(count != 0.0, count, 1.0)
            seq_ratio = tl.exp(tl.minimum(mean, 10.0))
            seq_in_range = tl.where(mean <= 10.0, 1.0, 0.0)
        acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_mask = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_clip = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_akl = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_ratio = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_rmax = tl.full([BLOCK_T], -float("inf"), dtype=tl.float32)
        acc_kl = tl.zeros([BLOCK_T], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            in_row = cols < n_cols
            m = tl.load(mask_ptr + base + cols, mask=in_row, other=0).to(tl.float32)
            live = m != 0.0
            # masked positions may hold anything (padding): load them as neutral values
            logp = tl.where(live, tl.load(logp_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
            old = tl.where(live, tl.load(old_logp_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
            adv = tl.where(live, tl.load(advantages_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
            loss, dloss, clipped, ratio = _policy_term(logp, old, adv, seq_ratio, seq_in_range, ratio_low,
                                                       ratio_high, dual_clip, tau_pos, tau_neg, POLICY, DUAL_CLIP)
            if HAS_WEIGHTS:
                w = tl.where(live, tl.load(weights_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
                loss = loss * w
                dloss = dloss * w
            if HAS_REF:
                ref = tl.where(live, tl.load(ref_logp_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
                kl, dkl = _kl_and_grad(logp, ref, KL_KIND)
                loss += kl_coef * kl
                dloss += kl_coef * dkl
                acc_kl += tl.where(live, kl * m, 0.0)
            tl.store(dloss_ptr + base + cols, tl.where(live, dloss * m, 0.0), mask=in_row)
            acc_loss += tl.where(live, loss * m, 0.0)
            acc_mask += m
            acc_clip += tl.where(live & clipped, m, 0.0)
            acc_akl += tl.where(live, (old - logp) * m, 0.0)
            acc_ratio += tl.where(live, ratio * m, 0.0)
            acc_rmax = tl.maximum(acc_rmax, tl.where(live, ratio, -float("inf")))
        out = partials_ptr + row * 7
        tl.store(out + 0, tl.sum(acc_loss, axis=0))
        tl.store(out + 1, tl.sum(acc_mask, axis=0))
        tl.store(out + 2, tl.sum(acc_clip, axis=0))
        tl.store(out + 3, tl.sum(acc_akl, axis=0))
        tl.store(out + 4, tl.sum(acc_ratio, axis=0))
        tl.store(out + 5, tl.max(acc_rmax, axis=0))
        tl.store(out + 6, tl.sum(acc_kl, axis=0))


def _grid(n_rows: int):
    return (max(1, min(n_rows, MAX_PROGRAMS)),)


def ppo_policy_loss_forward(logp, old_logp, advantages, mask, ref_logp, is_weights, policy, ratio_low, ratio_high,
                            dual_clip, kl_coef, kl_kind, tau_pos, tau_neg):
    """All [R, T] contiguous (mask float or uint8; ref_logp, is_weights optional); ``policy`` 0..3 (ppo, gspo,
    cispo, sapo). Returns (dloss [R, T] fp32, partials [R, 7] fp32)."""
    n_rows, n_cols = logp.shape
    dloss = torch.empty((n_rows, n_cols), dtype=torch.float32, device=logp.device)
    partials = torch.empty((n_rows, NUM_PARTIALS), dtype=torch.float32, device=logp.device)
    block_t = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    _ppo_policy_loss_fwd_kernel[_grid(n_rows)](
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp if ref_logp is not None else logp,
        is_weights if is_weights is not None else logp,
        dloss,
        partials,
        n_rows,
        n_cols,
        ratio_low,
        ratio_high,
        dual_clip if dual_clip is not None else 0.0,
        kl_coef,
        tau_pos,
        tau_neg,
        POLICY=policy,
        HAS_REF=ref_logp is not None,
        HAS_WEIGHTS=is_weights is not None,
        KL_KIND=KL_KINDS[kl_kind],
        DUAL_CLIP=dual_clip is not None,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return dloss, partials
