"""The PPO objective against float64 references written plainly here, on every backend (Triton under
TRITON_INTERPRET=1, the native C++ CPU kernels, the PyTorch twin)."""

import itertools

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

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KINDS = ["k1", "abs", "k2", "k3"]


@pytest.fixture(params=["torch", "triton", "native"])
def ppo_backend(request, monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", request.param)
    return request.param


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


def ref_aggregate(per_token, mask, agg):
    m = mask.double()
    rows_sum = torch.where(m != 0, per_token * m, torch.zeros_like(per_token)).sum(-1)
    rows_mask = m.sum(-1)
    counted = rows_mask != 0
    if agg == "token-mean":
        return rows_sum.sum() / rows_mask.sum() if rows_mask.sum() != 0 else rows_sum.sum() * 0
    if agg == "seq-mean-token-sum":
        return rows_sum[counted].sum() / counted.sum() if counted.any() else rows_sum.sum() * 0
    if agg == "seq-mean-token-mean":
        return (rows_sum[counted] / rows_mask[counted]).sum() / counted.sum() if counted.any() else rows_sum.sum() * 0
    return rows_sum.sum() / (per_token.shape[0] * per_token.shape[1])


def ref_policy_loss(logp, old, adv, mask, *, clip_low, clip_high, dual_clip, ref, kl_coef, kind, agg):
    """Returns (loss, grad wrt logp, stats) in float64, via autograd through the plain composition."""
    lp = logp.detach().double().requires_grad_()
    old, adv = old.double(), adv.double()
    ratio = torch.exp(torch.clamp(lp - old, -20, 20))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    clipped = (-adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)) > (-adv * ratio)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if ref is not None:
        kl = ref_kl(lp, ref.double(), kind)
        pg = pg + kl_coef * kl
    loss = ref_aggregate(pg, mask, agg)
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True)
    m = mask.double()
    stats = {
        "clipfrac": ref_aggregate(clipped.double(), mask, "token-mean"),
        "approx_kl": ref_aggregate(old - lp.detach(), mask, "token-mean"),
        "ratio_mean": ref_aggregate(ratio.detach(), mask, "token-mean"),
        "ratio_max": ratio.detach()[m != 0].max() if (m != 0).any() else torch.tensor(0.0, dtype=torch.float64),
    }
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


@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch_gives_zero_not_nan(ppo_backend, agg):
    logp, old, adv, ref = make_batch()
    old[0, 0] = float("nan")  # padding may hold anything
    mask = torch.zeros_like(logp, dtype=torch.bool)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg=agg)
    loss.backward()
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
