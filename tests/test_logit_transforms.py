"""Final logit soft-capping (Gemma 2) and logit scales (Granite, Cohere) fused into token_logprobs and
linear_logprobs, forward and backward, on both backends, against float64 formulas written here."""

import pytest
import torch

from rlhf_engine.ops import linear_logprobs, token_logprobs

TRANSFORMS = [(30.0, 1.0), (None, 0.25), (5.0, 2.0)]  # (softcap, logit_scale)


def transformed(logits, softcap, logit_scale, temperature):
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logprobs_and_entropy(z, targets):
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != -100
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def check_against_float64(ours, leaves, fn, g_logp, g_ent, dtype):
    """ours: (logp, entropy) from our op with the leaves' grads filled; fn(*leaves) the same math in any dtype.
    Outputs within fp32 tolerance of float64; gradients within twice eager's error in the leaves' dtype."""
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    ref_logp, ref_ent = fn(*leaves64)
    (ref_logp * g_logp.double() + ref_ent * g_ent.double()).sum().backward()
    eager = [x.detach().clone().requires_grad_() for x in leaves]
    e_logp, e_ent = fn(*eager)
    (e_logp.float() * g_logp + e_ent.float() * g_ent).sum().backward()
    tol = 2e-4 if dtype == torch.float32 else 0.2
    torch.testing.assert_close(ours[0].double(), ref_logp.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(ours[1].double(), ref_ent.detach(), atol=tol, rtol=0)
    for x, x64, xe in zip(leaves, leaves64, eager, strict=True):
        assert x.grad.dtype == dtype
        ours_err = (x.grad.double() - x64.grad).abs().max().item()
        eager_err = (xe.grad.double() - x64.grad).abs().max().item()
        # a few fp32 ulps (sums over the vocabulary in another order), and one ulp of the gradient's own dtype: an
        # fp32 value a hair away from eager's may round to the neighbouring bf16
        ulp = max(64 * torch.finfo(torch.float32).eps, torch.finfo(dtype).eps)
        floor = ulp * max(1.0, x64.grad.abs().max().item())
        assert ours_err <= 2 * eager_err + floor, (ours_err, eager_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap, logit_scale", TRANSFORMS)
def test_token_logprobs_with_transforms(backend, softcap, logit_scale, dtype):
    n, v, temperature = 13, 1271, 0.7
    logits = (torch.randn(n, v) * 20).to(dtype)  # large enough for the cap to bend them
    logits[2, 5:40] = float("-inf")  # masked vocabulary entries: capped to -softcap, as the model's own forward
    targets = torch.randint(40, v, (n,))
    targets[[0, 7]] = -100
    x = logits.clone().requires_grad_()
    ours = token_logprobs(x, targets, temperature=temperature, return_entropy=True, softcap=softcap,
                          logit_scale=logit_scale)
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    (ours[0] * g_logp + ours[1] * g_ent).sum().backward()
    assert torch.isfinite(x.grad.float()).all() and torch.all(x.grad[[0, 7]] == 0)

    def fn(lg):
        return logprobs_and_entropy(transformed(lg.float() if lg.dtype != torch.float64 else lg, softcap,
                                                logit_scale, temperature), targets)

    if softcap is None:  # -inf logits stay -inf: the float64 and eager references must not see NaN gradients
        logits[2, 5:40] = -1e4
        x.grad = None
        x = logits.clone().requires_grad_()
        ours = token_logprobs(x, targets, temperature=temperature, return_entropy=True, logit_scale=logit_scale)
        (ours[0] * g_logp + ours[1] * g_ent).sum().backward()
    check_against_float64(ours, [x], fn, g_logp, g_ent, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap, logit_scale", TRANSFORMS)
def test_linear_logprobs_with_transforms(backend, softcap, logit_scale, dtype):
    n, h, v, temperature = 29, 24, 1271, 0.9
    hidden = (torch.randn(n, h) * 3).to(dtype)
    weight = (torch.randn(v, h) * 2 / h**0.5).to(dtype)
    bias = torch.randn(v).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.3] = -100
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ours = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                           return_entropy=True, chunk_size=6, softcap=softcap, logit_scale=logit_scale)
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    (ours[0] * g_logp + ours[1] * g_ent).sum().backward()

    def fn(hd, w, b):
        logits = torch.nn.functional.linear(hd, w, b)
        return logprobs_and_entropy(transformed(logits.float() if logits.dtype != torch.float64 else logits,
                                                softcap, logit_scale, temperature), targets)

    check_against_float64(ours, leaves, fn, g_logp, g_ent, dtype)


def test_transforms_are_the_plain_op_on_transformed_logits(backend):
    """logit_scale alone is a temperature: token_logprobs(x, logit_scale=s) == token_logprobs(s x)."""
    logits, targets = torch.randn(5, 33), torch.randint(0, 33, (5,))
    torch.testing.assert_close(token_logprobs(logits, targets, logit_scale=0.5), token_logprobs(logits * 0.5, targets))


@pytest.mark.parametrize("kwargs, match", [(dict(softcap=0.0), "softcap"), (dict(softcap=-3.0), "softcap"),
                                           (dict(logit_scale=0.0), "logit_scale"),
                                           (dict(logit_scale=float("nan")), "logit_scale")])
def test_bad_transform_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), **kwargs)
