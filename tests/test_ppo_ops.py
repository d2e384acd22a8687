"""The PPO objective against float64 references written plainly here, on every backend (Triton under
TRITON_INTERPRET=1, the native C++ CPU kernels, the PyTorch twin)."""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

from rlhf_engine.ops import (
    aggregate_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)

AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
POLICIES = ["ppo", "gspo", "cispo", "sapo"]
KINDS = ["k1", "abs", "k2", "k3"]


# ---------------------------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------------------------
def ref_kl(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "abs":
        return (logp - ref).abs()
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    d = torch.clamp(ref - logp, -20, 20)
    return torch.clamp(torch.exp(d) - d - 1, -10, 10)


def ref_aggregate(per_token, mask, agg, agg_norm=None):
    m = mask.double()
    rows_sum = torch.where(m != 0, per_token * m, torch.zeros_like(per_token)).sum(-1)
    rows_mask = m.sum(-1)
    counted = rows_mask != 0
    if agg == "token-mean":
        return rows_sum.sum() / rows_mask.sum() if rows_mask.sum() != 0 else rows_sum.sum() * 0
    if agg == "token-sum":
        return rows_sum.sum()
    if agg == "seq-mean-token-sum":
        return rows_sum[counted].sum() / counted.sum() if counted.any() else rows_sum.sum() * 0
    if agg == "seq-mean-token-mean":
        return (rows_sum[counted] / rows_mask[counted]).sum() / counted.sum() if counted.any() else rows_sum.sum() * 0
    return rows_sum.sum() / (per_token.shape[0] * (per_token.shape[1] if agg_norm is None else agg_norm))


def ref_policy_term(lp, old, adv, mask, policy, clip_low, clip_high, dual_clip, tau_pos, tau_neg):
    """The per-token policy term of each kind in float64, written from the papers' formulas (stop-gradients as
    detach), and the per-token (clipped, ratio) statistics."""
    lo, hi = 1 - clip_low, 1 + clip_high
    ratio = torch.exp(torch.clamp(lp - old, -20, 20))
    if policy == "gspo":
        m = mask.double()
        seq = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        s = torch.exp(torch.clamp(lp - lp.detach() + seq.detach()[:, None], max=10.0))
        pg1, pg2 = -adv * s, -adv * torch.clamp(s, lo, hi)
        return torch.maximum(pg1, pg2), pg2 > pg1, s.detach()
    if policy == "cispo":
        clipped = (ratio < lo) | (ratio > hi)
        return -torch.clamp(ratio, lo, hi).detach() * adv * lp, clipped, ratio.detach()
    if policy == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
        return -adv * torch.sigmoid(tau * (ratio - 1)) * 4 / tau, None, ratio.detach()
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, lo, hi)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    return pg, pg2 > pg1, ratio.detach()


def ref_policy_loss(logp, old, adv, mask, *, clip_low, clip_high, dual_clip, ref, kl_coef, kind, agg, policy="ppo",
                    is_weights=None, agg_norm=None, tau_pos=1.0, tau_neg=1.05):
    """Returns (loss, grad wrt logp, stats) in float64, via autograd through the plain composition."""
    m = mask.double()
    live = m != 0
    lp = torch.where(live, logp.double(), 0.0).detach().requires_grad_()  # masked entries may be NaN
    old, adv = torch.where(live, old.double(), 0.0), torch.where(live, adv.double(), 0.0)
    pg, clipped, ratio = ref_policy_term(lp, old, adv, mask, policy, clip_low, clip_high, dual_clip, tau_pos,
                                         tau_neg)
    if is_weights is not None:
        pg = pg * torch.where(live, is_weights.double(), 0.0)
    if ref is not None:
        kl = ref_kl(lp, torch.where(live, ref.double(), 0.0), kind)
        pg = pg + kl_coef * kl
    loss = ref_aggregate(pg, mask, agg, agg_norm)
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True)
    stats = {
        "approx_kl": ref_aggregate(old - lp.detach(), mask, "token-mean"),
        "ratio_mean": ref_aggregate(ratio, mask, "token-mean"),
        "ratio_max": ratio[live].max() if live.any() else torch.tensor(0.0, dtype=torch.float64),
    }
    if clipped is not None:
        stats["clipfrac"] = ref_aggregate(clipped.double(), mask, "token-mean")
    if ref is not None:
        stats["kl_mean"] = ref_aggregate(kl.detach(), mask, "token-mean")
    return loss.detach(), (grad if grad is not None else torch.zeros_like(lp)), stats


def ragged_mask(b, t, *, interior=True, empty_row=True):
    """Right-padded rows of random lengths, some interior masked spans, one all-masked row."""
    lengths = torch.randint(1, t + 1, (b,))
    mask = torch.arange(t)[None, :] < lengths[:, None]
    if interior:
        for row in range(0, b, 2):
            a = int(torch.randint(0, t, ()))
            mask[row, a : a + 3] = False
    if empty_row:
        mask[b // 2] = False
    return mask


def make_batch(b=6, t=37, dtype=torch.float32, scale=0.3):
    logp = -torch.rand(b, t) * 3
    old = logp + torch.randn(b, t) * scale
    ref = logp + torch.randn(b, t) * scale
    adv = torch.randn(b, t)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), ref.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# ppo_policy_loss
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kind", KINDS)
def test_policy_loss_matches_float64(ppo_backend, kind, agg):
    logp, old, adv, ref = make_batch()
    mask = ragged_mask(*logp.shape)
    for dual_clip, (clip_low, clip_high), with_kl in itertools.product([None, 3.0], [(0.2, 0.2), (0.2, 0.28)],
                                                                       [False, True]):
        kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kind=kind, agg=agg)
        kwargs.update(ref=ref if with_kl else None, kl_coef=0.1 if with_kl else 0.0)
        x = logp.clone().requires_grad_()
        g = float(torch.randn(()))
        loss, stats = ppo_policy_loss(
            x, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            ref_logp=kwargs["ref"], kl_coef=kwargs["kl_coef"], kl_kind=kind, agg=agg,
        )
        (loss * g).backward()
        ref_loss, ref_grad, ref_stats = ref_policy_loss(logp, old, adv, mask, **kwargs)
        msg = f"{kwargs}"
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5, msg=msg)
        torch.testing.assert_close(x.grad.double(), ref_grad * g, atol=1e-6, rtol=1e-5, msg=msg)
        assert set(stats) == set(ref_stats)
        for name in stats:
            torch.testing.assert_close(stats[name].double(), ref_stats[name], atol=1e-5, rtol=1e-5, msg=name)


def test_policy_loss_bf16_inputs(ppo_backend):
    logp, old, adv, ref = make_batch(dtype=torch.bfloat16)
    mask = ragged_mask(*logp.shape)
    x = logp.clone().requires_grad_()
    loss, _ = ppo_policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.05, dual_clip=3.0)
    loss.backward()
    kwargs = dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, ref=ref, kl_coef=0.05, kind="k3", agg="token-mean")
    ref_loss, ref_grad, _ = ref_policy_loss(logp, old, adv, mask, **kwargs)
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-4, rtol=1e-2)


def check_policy_loss(logp, old, adv, mask, *, atol=1e-5, grad_atol=1e-6, **kwargs):
    """ppo_policy_loss on the current backend against ref_policy_loss: loss, gradient (under a random upstream
    gradient) and every statistic."""
    names = dict(ref="ref_logp", kind="kl_kind", policy="policy_loss", is_weights="rollout_is_weights",
                 tau_pos="sapo_tau_pos", tau_neg="sapo_tau_neg")
    x = logp.clone().requires_grad_()
    g = float(torch.randn(()))
    loss, stats = ppo_policy_loss(x, old, adv, mask, **{names.get(k, k): v for k, v in kwargs.items()})
    (loss * g).backward()
    ref_loss, ref_grad, ref_stats = ref_policy_loss(logp, old, adv, mask, **kwargs)
    msg = f"{ {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)} }"
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=1e-5, msg=msg)
    torch.testing.assert_close(x.grad.double(), ref_grad * g, atol=grad_atol, rtol=1e-5, msg=msg)
    assert set(stats) == set(ref_stats), msg
    for name in stats:
        torch.testing.assert_close(stats[name].double(), ref_stats[name], atol=1e-5, rtol=1e-5, msg=f"{name} {msg}")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("policy", ["gspo", "cispo", "sapo"])
def test_policy_kinds_match_float64(ppo_backend, policy, agg):
    """Each kind on a ragged batch (interior gaps, an all-masked row, NaN padding), with and without rollout IS
    weights and a k3 KL term, symmetric and clip-higher ranges; the advantages per sequence as GRPO makes them."""
    logp, old, _, ref = make_batch(b=7, t=37, scale=0.4)
    mask = ragged_mask(*logp.shape)
    adv = torch.randn(7, 1).expand(7, 37).contiguous()
    adv[1] = torch.randn(37)  # per-token advantages are accepted too
    adv[2] = 0.0
    weights = torch.rand(7, 37) * 2
    for t in (logp, old, adv, ref, weights):
        t[~mask] = float("nan")
    for (clip_low, clip_high), with_weights, with_kl in itertools.product([(0.2, 0.2), (0.2, 0.28)], [False, True],
                                                                          [False, True]):
        check_policy_loss(logp, old, adv, mask, policy=policy, clip_low=clip_low, clip_high=clip_high,
                          dual_clip=None, ref=ref if with_kl else None, kl_coef=0.1 if with_kl else 0.0, kind="k3",
                          agg=agg, is_weights=weights if with_weights else None, tau_pos=0.9, tau_neg=1.3)


def test_ppo_with_is_weights_and_dual_clip_matches_float64(ppo_backend):
    logp, old, adv, ref = make_batch(b=5, t=29, scale=0.5)
    mask = ragged_mask(5, 29)
    check_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref=ref, kl_coef=0.05,
                      kind="k2", agg="token-mean", is_weights=torch.rand(5, 29) * 3)


@pytest.mark.parametrize("policy", POLICIES)
def test_agg_norm_divides_by_a_fixed_length(ppo_backend, policy):
    logp, old, adv, _ = make_batch(b=4, t=11)
    mask = ragged_mask(4, 11)
    check_policy_loss(logp, old, adv, mask, policy=policy, clip_low=0.2, clip_high=0.2, dual_clip=None, ref=None,
                      kl_coef=0.0, kind="k3", agg="seq-mean-token-sum-norm", agg_norm=64.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_kinds_bf16_inputs(ppo_backend, policy):
    logp, old, adv, ref = make_batch(dtype=torch.bfloat16)
    mask = ragged_mask(*logp.shape)
    x = logp.clone().requires_grad_()
    loss, _ = ppo_policy_loss(x, old, adv, mask, policy_loss=policy, ref_logp=ref, kl_coef=0.05)
    loss.backward()
    agg = "seq-mean-token-mean" if policy in ("gspo", "sapo") else "token-mean"  # the kinds' default
    ref_loss, ref_grad, _ = ref_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=None,
                                            ref=ref, kl_coef=0.05, kind="k3", agg=agg, policy=policy)
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("policy", POLICIES)
def test_rows_longer_than_one_tile(ppo_backend, policy):
    """T = 2500 spans three of the Triton kernel's 1024-token tiles (and GSPO's row mean spans all of them)."""
    logp, old, adv, ref = make_batch(b=3, t=2500)
    mask = ragged_mask(3, 2500, empty_row=False)
    mask[0] = True
    check_policy_loss(logp, old, adv, mask, policy=policy, clip_low=0.2, clip_high=0.28, dual_clip=None, ref=ref,
                      kl_coef=0.1, kind="k3", agg="token-mean", atol=1e-4)


@pytest.mark.parametrize("policy", POLICIES)
def test_more_rows_than_programs(monkeypatch, policy):
    """The Triton launch grid is capped (CUDA limits grid dimensions): programs stride over the other rows."""
    from rlhf_engine.kernels import ppo_loss as kernels

    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "triton")
    monkeypatch.setattr(kernels, "MAX_PROGRAMS", 3)
    logp, old, adv, ref = make_batch(b=11, t=13)
    check_policy_loss(logp, old, adv, ragged_mask(11, 13), policy=policy, clip_low=0.2, clip_high=0.2,
                      dual_clip=None, ref=ref, kl_coef=0.1, kind="k1", agg="seq-mean-token-sum")


def test_native_baseline_simd_copy_matches():
    """The native row loop is compiled twice (x86-64 baseline and AVX2+FMA, picked at run time);
    ATEN_CPU_CAPABILITY=default forces the baseline copy, which must agree with the float64 formulas as well."""
    script = """
import itertools, os, sys, torch
sys.path.insert(0, sys.argv[1])
os.environ["RLHF_ENGINE_BACKEND"] = "native"
from test_ppo_ops import POLICIES, KINDS, check_policy_loss, make_batch, ragged_mask
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
torch.manual_seed(0)
logp, old, adv, ref = make_batch(b=5, t=45)
mask = ragged_mask(5, 45)
for policy, kind in itertools.product(POLICIES, KINDS):
    check_policy_loss(logp, old, adv, mask, policy=policy, clip_low=0.2, clip_high=0.28, dual_clip=None, ref=ref,
                      kl_coef=0.1, kind=kind, agg="seq-mean-token-sum", is_weights=torch.rand(5, 45))
print("ok")
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", script, tests_dir], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_sapo_gate_far_from_one(ppo_backend):
    """Ratios of e^20 and e^-20 (the clamp) with a large tau: a finite loss, the gate's exact tails."""
    logp = torch.zeros(1, 4)
    old = torch.tensor([[-50.0, 50.0, -3.0, 2.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -0.5]])
    check_policy_loss(logp, old, adv, torch.ones(1, 4), policy="sapo", clip_low=0.2, clip_high=0.2, dual_clip=None,
                      ref=None, kl_coef=0.0, kind="k3", agg="token-mean", tau_pos=40.0, tau_neg=0.5)


def test_gspo_sequence_ratio_clamped_at_e10(ppo_backend):
    """A row whose mean log-ratio is above 10 has s = e^10 and no gradient; the other row is unaffected."""
    logp = torch.zeros(2, 5)
    old = torch.tensor([[-12.0] * 5, [0.1, -0.1, 0.05, 0.0, 0.2]])
    adv = torch.tensor([[-1.0] * 5, [0.5] * 5])
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, torch.ones(2, 5), policy_loss="gspo")
    loss.backward()
    assert torch.all(x.grad[0] == 0) and torch.all(x.grad[1] != 0)
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(math.exp(10.0)))


@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch_gives_zero_not_nan(ppo_backend, agg):
    logp, old, adv, ref = make_batch()
    old[0, 0] = float("nan")  # padding may hold anything
    mask = torch.zeros_like(logp, dtype=torch.bool)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg=agg)
    (loss * 65536.0).backward()  # an fp16 loss scale upstream: still zeros, never 0 * inf
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    assert all(v.item() == 0.0 for v in stats.values())


def test_garbage_in_masked_positions_is_ignored(ppo_backend):
    logp, old, adv, ref = make_batch()
    mask = ragged_mask(*logp.shape)
    dirty = [t.clone() for t in (logp, old, adv, ref)]
    for t in dirty:
        t[~mask] = float("nan")
    dirty[1][~mask & (torch.rand(mask.shape) < 0.5)] = float("inf")
    x_clean, x_dirty = logp.clone().requires_grad_(), dirty[0].clone().requires_grad_()
    loss_clean, _ = ppo_policy_loss(x_clean, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    loss_dirty, _ = ppo_policy_loss(x_dirty, dirty[1], dirty[2], mask, ref_logp=dirty[3], kl_coef=0.1)
    loss_clean.backward()
    loss_dirty.backward()
    assert torch.equal(loss_clean, loss_dirty)
    assert torch.equal(x_clean.grad, x_dirty.grad)


def test_float_mask_and_leading_shape(ppo_backend):
    logp, old, adv, _ = make_batch(b=4, t=9)
    mask = ragged_mask(4, 9).float()
    loss_2d, _ = ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    loss_3d, _ = ppo_policy_loss(*(t.view(2, 2, 9) for t in (logp, old, adv, mask)), agg="seq-mean-token-mean")
    torch.testing.assert_close(loss_2d, loss_3d)


def test_large_ratio_is_clamped_not_inf(ppo_backend):
    logp = torch.zeros(1, 4)
    old = torch.tensor([[-50.0, 0.0, 0.0, 50.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0]])
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, torch.ones(1, 4), dual_clip=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(stats["ratio_max"])


def test_policy_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.05  # ratios well inside the clip range
    adv, ref = torch.randn(3, 5, dtype=torch.float64), logp.detach() - 0.1
    mask = ragged_mask(3, 5, interior=False, empty_row=False)

    def fn(x):
        return ppo_policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.2, agg="seq-mean-token-mean")[0].double()

    assert torch.autograd.gradcheck(fn, (logp,), eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_low=0.0), "clip_low"),
        (dict(clip_low=-0.1), "clip_low"),
        (dict(clip_high=0.0), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(agg="mean"), "agg"),
        (dict(kl_kind="k4", ref_logp=torch.zeros(2, 3)), "kl_kind"),
        (dict(kl_coef=0.1), "ref_logp"),
        (dict(ref_logp=torch.zeros(2, 4)), "ref_logp shape"),
        (dict(policy_loss="grpo"), "policy_loss must be one of"),
        (dict(policy_loss="gspo", dual_clip=3.0), "dual_clip applies to policy_loss='ppo' only"),
        (dict(agg_norm=100.0), "agg_norm applies to agg='seq-mean-token-sum-norm'"),
        (dict(agg="seq-mean-token-sum-norm", agg_norm=0.0), "agg_norm must be > 0"),
        (dict(policy_loss="sapo", sapo_tau_neg=0.0), "sapo_tau_neg"),
        (dict(rollout_is_weights=torch.ones(2, 2)), "rollout_is_weights shape"),
        (dict(rollout_is_weights=torch.ones(2, 3, dtype=torch.long)), "rollout_is_weights must be a floating"),
    ],
)
def test_policy_bad_input_is_named(kwargs, match):
    logp, old, adv, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=match):
        ppo_policy_loss(logp, old, adv, mask, **kwargs)


def test_policy_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="advantages shape"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# kl_penalty, value_loss, aggregation, masked helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_kl_penalty_matches_reference_and_grads(kind):
    logp, _, _, ref = make_batch(scale=2.0)
    ref[0, :3] = logp[0, :3] + 30.0  # clamp ranges of k3
    x = logp.clone().requires_grad_()
    kl = kl_penalty(x, ref, kind)
    kl.sum().backward()
    x64 = logp.double().requires_grad_()
    ref_kl(x64, ref.double(), kind).sum().backward()
    torch.testing.assert_close(kl.double(), ref_kl(logp.double(), ref.double(), kind), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(torch.zeros(3), torch.zeros(3), "kl")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_float64(agg, clip):
    values, old_values, returns = torch.randn(5, 11), torch.randn(5, 11), torch.randn(5, 11)
    mask = ragged_mask(5, 11)
    v = values.clone().requires_grad_()
    loss, stats = value_loss(v, old_values, returns, mask, clip=clip, agg=agg)
    loss.backward()
    v64 = values.double().requires_grad_()
    unclipped = (v64 - returns.double()) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
    else:
        clipped_v = old_values.double() + torch.clamp(v64 - old_values.double(), -clip, clip)
        per_token = 0.5 * torch.maximum(unclipped, (clipped_v - returns.double()) ** 2)
    ref = ref_aggregate(per_token, mask, agg)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=1e-6, rtol=1e-5)
    assert 0.0 <= stats["clipfrac"].item() <= 1.0


def test_value_loss_rejects_bad_clip():
    with pytest.raises(ValueError, match="clip"):
        value_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2), clip=0.0)


def test_aggregate_and_masked_helpers():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 7 + 9) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 0.0, 8.0]))
    assert aggregate_loss(x, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 16) / 2)
    assert aggregate_loss(x, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 8) / 2)
    assert aggregate_loss(x, mask, "seq-mean-token-sum-norm").item() == pytest.approx(19 / 9)
    white = masked_whiten(x, mask)
    live = white[mask]
    assert live.mean().abs().item() < 1e-6 and live.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.all(white[~mask] == 0)
    shifted = masked_whiten(x, mask, shift_mean=False)[mask]
    assert shifted.mean().item() == pytest.approx(x[mask].mean().item(), rel=1e-5)
