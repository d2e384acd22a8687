"""token_logprobs against a float64 reference, on both backends (Triton under TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from rlhf_engine.kernels import logprobs as kernels
from rlhf_engine.ops import logprobs as ops_logprobs
from rlhf_engine.ops import token_logprobs

# (dtype, atol, rtol) for the fp32 outputs against float64 math on the same input values
OUTPUT_TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-5, 1e-5), torch.float16: (2e-5, 1e-5)}
# Gradients: at most twice the error of eager PyTorch in the same dtype, plus a few fp32 ulps of the gradient's
# scale times sqrt(V): fp32 sums over the vocabulary round differently in any two correct orders of evaluation.
GRAD_ULPS = 4


def reference(logits, targets, temperature=1.0, ignore_index=-100):
    """float64, written plainly: log_softmax, gather, entropy; ignored positions 0."""
    z = logits.double() / temperature
    logp_all = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(torch.where(p > 0, p * logp_all, torch.zeros_like(p))).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def make_inputs(n, v, dtype, ignore_frac=0.25, scale=4.0):
    logits = (torch.randn(n, v) * scale).to(dtype)
    targets = torch.randint(0, v, (n,))
    ignored = torch.rand(n) < ignore_frac
    targets[ignored] = -100
    return logits, targets


def grad_error_bound(logits, targets, temperature, g_logp, g_ent):
    """Max error of eager PyTorch autograd in the logits' own dtype against float64: our error may be ~2x it."""
    x64 = logits.detach().double().requires_grad_()
    lp64, ent64 = reference(x64, targets, temperature)
    (lp64 * g_logp + ent64 * g_ent).sum().backward()
    x = logits.detach().clone().requires_grad_()
    lp_all = torch.log_softmax(x / temperature, dim=-1)
    valid = targets != -100
    lp = lp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(lp_all.exp() * lp_all).sum(-1) * valid
    (lp.float() * g_logp + ent.float() * g_ent).sum().backward()
    return x64.grad, (x.grad.double() - x64.grad).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize("v", [1, 7, 1000, 32003])
def test_forward_backward_matches_float64(backend, n, v, dtype):
    if backend == "triton" and n * v > 300_000:
        n = 9  # the interpreter runs one program at a time: keep the awkward V, shrink N
    temperature = 0.7 if v % 2 else 1.0
    logits, targets = make_inputs(n, v, dtype)
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, targets, temperature=temperature, return_entropy=True)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    ref_logp, ref_entropy = reference(logits, targets, temperature)
    atol, rtol = OUTPUT_TOL[dtype]
    atol = atol * max(1.0, abs(ref_logp).max().item())
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=rtol)

    g_logp, g_ent = torch.randn(n), torch.randn(n)
    (logp * g_logp + entropy * g_ent).sum().backward()
    ref_grad, eager_err = grad_error_bound(logits, targets, temperature, g_logp, g_ent)
    assert x.grad.dtype == dtype
    ours_err = (x.grad.double() - ref_grad).abs().max().item()
    scale = max(1.0, ref_grad.abs().max().item(), (g_logp.abs().max() + g_ent.abs().max()).item())
    floor = GRAD_ULPS * torch.finfo(torch.float32).eps * scale * v**0.5
    assert ours_err <= 2 * eager_err + floor, (ours_err, eager_err)
    ignored = targets == -100
    assert torch.all(x.grad[ignored] == 0)
    assert torch.all(logp[ignored] == 0) and torch.all(entropy[ignored] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_path_over_several_chunks(monkeypatch, temperature, return_entropy, dtype):
    """The PyTorch path's reused chunk buffers (fp32 gradients built in place, others through fp32 scratch): 10 rows
    in chunks of 3, 3, 3 and 1."""
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    n, v = 10, 1271
    monkeypatch.setattr(ops_logprobs, "DEFAULT_CHUNK_ELEMENTS", 3 * v)
    logits, targets = make_inputs(n, v, dtype)
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, targets, temperature=temperature, return_entropy=return_entropy)
    logp, entropy = out if return_entropy else (out, None)
    g_logp = torch.randn(n)
    g_ent = torch.randn(n) if return_entropy else torch.zeros(n)
    (logp * g_logp + (0 if entropy is None else entropy * g_ent)).sum().backward()
    ref_logp, ref_entropy = reference(logits, targets, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5 * max(1.0, ref_logp.abs().max().item()), rtol=1e-5)
    if return_entropy:
        torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=1e-5)
    ref_grad, eager_err = grad_error_bound(logits, targets, temperature, g_logp, g_ent)
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    floor = GRAD_ULPS * torch.finfo(torch.float32).eps * max(1.0, ref_grad.abs().max().item()) * v**0.5
    assert (x.grad.double() - ref_grad).abs().max().item() <= 2 * eager_err + floor
    assert torch.all(x.grad[targets == -100] == 0)


def test_logprob_only_gradient_and_leading_shape(backend):
    b, t, v = 2, 5, 37
    logits = torch.randn(b, t, v, requires_grad=True)
    targets = torch.randint(0, v, (b, t))
    targets[1, 3:] = -100
    logp = token_logprobs(logits, targets, temperature=1.3)
    assert logp.shape == (b, t)
    g = torch.randn(b, t)
    (logp * g).sum().backward()
    x64 = logits.detach().double().requires_grad_()
    (reference(x64, targets, 1.3)[0] * g).sum().backward()
    torch.testing.assert_close(logp.double(), reference(logits.detach(), targets, 1.3)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_entropy_only_gradient(backend):
    logits = torch.randn(6, 50, requires_grad=True)
    targets = torch.randint(0, 50, (6,))
    _, entropy = token_logprobs(logits, targets, return_entropy=True)
    entropy.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    reference(x64, targets)[1].sum().backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_all_positions_ignored(backend):
    logits = torch.randn(4, 11, requires_grad=True)
    targets = torch.full((4,), -100)
    logp, entropy = token_logprobs(logits, targets, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("case", ["columns", "whole tile"])
def test_masked_vocabulary_entries_are_finite(backend, case):
    """-inf logits (tokens banned by a logits processor): a few columns, or a row's whole first 4096-wide tile, from
    which the online softmax starts with nothing (exp(-inf - -inf) must not make the row NaN)."""
    if case == "columns":
        logits, targets, banned = torch.randn(3, 20), torch.tensor([0, 4, 19]), [(slice(None), slice(5, 9))]
    else:  # row 1: only the tail is live, across the tile boundary
        logits, targets = torch.randn(3, 4096 + 1301), torch.tensor([4100, 5003, 17])
        banned = [(0, slice(0, 4096)), (1, slice(0, 5000))]
    for index in banned:
        logits[index] = float("-inf")
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, targets, return_entropy=True)
    (logp + entropy).sum().backward()
    ref_logp, ref_entropy = reference(logits, targets)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all()
    assert all(torch.all(x.grad[index] == 0) for index in banned)


def test_custom_ignore_index_and_fp16(backend):
    logits = torch.randn(5, 33).half()
    targets = torch.tensor([3, 0, 32, 0, 7])
    logp = token_logprobs(logits, targets, ignore_index=0)
    ref = reference(logits, targets, ignore_index=0)[0]
    torch.testing.assert_close(logp.double(), ref, atol=2e-5, rtol=1e-5)
    assert logp[1] == 0 and logp[3] == 0


def test_non_contiguous_logits(backend):
    base = torch.randn(7, 64)
    logits = base[:, ::2]  # stride(-1) == 2
    targets = torch.randint(0, 32, (7,))
    torch.testing.assert_close(token_logprobs(logits, targets).double(), reference(logits, targets)[0], atol=1e-5,
                               rtol=1e-5)


def test_non_contiguous_targets(backend):
    """labels[:, 1:] of a [B, 2] batch: targets whose reshape(-1) is a strided view, not a copy."""
    logits = torch.randn(7, 1, 40, requires_grad=True)
    labels = torch.randint(0, 40, (7, 2))
    targets = labels[:, 1:]  # stride (2, 1)
    logp = token_logprobs(logits, targets)
    logp.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    reference(x64, targets.contiguous())[0].sum().backward()
    torch.testing.assert_close(logp.double(), reference(logits.detach(), targets.contiguous())[0], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_more_rows_than_programs(backend, monkeypatch):
    # The launch grid is capped; programs stride over the remaining rows (CUDA limits grid dimensions).
    monkeypatch.setattr(kernels, "MAX_PROGRAMS", 4)
    logits = torch.randn(23, 9, requires_grad=True)
    targets = torch.randint(0, 9, (23,))
    targets[5] = -100
    logp = token_logprobs(logits, targets)
    logp.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    reference(x64, targets)[0].sum().backward()
    torch.testing.assert_close(logp.double(), reference(logits.detach(), targets)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_large_vocabulary_torch_path(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    logits, targets = make_inputs(3, 151936, torch.bfloat16)
    logp, entropy = token_logprobs(logits, targets, return_entropy=True)
    ref_logp, ref_entropy = reference(logits, targets)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-4, rtol=1e-5)


def test_gradcheck_float64_torch_path(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 5, 0])

    def fn(x):
        logp, entropy = token_logprobs(x, targets, temperature=0.9, return_entropy=True)
        return logp.double(), entropy.double()

    # outputs are fp32 by contract: loosen gradcheck's tolerance to fp32 resolution
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(logits=torch.randint(0, 5, (3, 5)), targets=torch.zeros(3, dtype=torch.long)), TypeError, "logits"),
        (dict(logits=torch.randn(3, 5), targets=torch.zeros(4, dtype=torch.long)), ValueError, "targets shape"),
        (dict(logits=torch.randn(3, 5), targets=torch.zeros(3)), TypeError, "targets must be an integer"),
        (dict(logits=torch.randn(3, 5), targets=torch.tensor([0, 5, 1])), ValueError, r"\[0, 5\).*found 5"),
        (dict(logits=torch.randn(3, 5), targets=torch.tensor([0, -1, 1])), ValueError, "found -1"),
        (dict(logits=torch.randn(3, 5), targets=torch.zeros(3, dtype=torch.long), temperature=0.0), ValueError,
         "temperature"),
        (dict(logits=torch.randn(3, 0), targets=torch.zeros(3, dtype=torch.long)), ValueError, "V >= 1"),
    ],
)
def test_bad_input_is_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        token_logprobs(**kwargs)
