"""linear_logprobs (LM head fused with the log-prob gather, chunked) against a float64 reference, both backends."""

import pytest
import torch

from rlhf_engine.ops import linear_logprobs, token_logprobs
from rlhf_engine.ops import logprobs as ops_logprobs


def reference64(hidden, weight, bias, targets, temperature=1.0, ignore_index=-100):
    """float64: logits = h W^T + b, then log_softmax, gather and entropy, written plainly."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    z = logits / temperature
    logp_all = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def grads64(hidden, weight, bias, targets, temperature, g_logp, g_ent):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    logp, entropy = reference64(leaves[0], leaves[1], b, targets, temperature)
    (logp * g_logp + entropy * g_ent).sum().backward()
    return logp, entropy, leaves[0].grad, leaves[1].grad, (None if b is None else b.grad)


def eager_grads(hidden, weight, bias, targets, temperature, g_logp, g_ent):
    """Eager PyTorch in the inputs' own dtype: the error budget for ours."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    logits = torch.nn.functional.linear(leaves[0], leaves[1], b)
    lp_all = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != -100
    logp = lp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(lp_all.exp() * lp_all).sum(-1) * valid
    (logp.float() * g_logp + entropy.float() * g_ent).sum().backward()
    return leaves[0].grad, leaves[1].grad, (None if b is None else b.grad)


def max_err(a, b):
    return (a.double() - b).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n, h, v, chunk", [(1, 8, 7, None), (37, 24, 1000, 5), (20, 16, 32003, 7)])
def test_matches_float64(backend, n, h, v, chunk, with_bias, dtype):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    bias = torch.randn(v).to(dtype) if with_bias else None
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.3] = -100
    temperature = 0.8
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    b = None if bias is None else bias.clone().requires_grad_()
    logp, entropy = linear_logprobs(
        leaves[0], leaves[1], targets, bias=b, temperature=temperature, return_entropy=True, chunk_size=chunk
    )
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    (logp * g_logp + entropy * g_ent).sum().backward()
    ref_logp, ref_ent, ref_gh, ref_gw, ref_gb = grads64(hidden, weight, bias, targets, temperature, g_logp, g_ent)
    eager_gh, eager_gw, eager_gb = eager_grads(hidden, weight, bias, targets, temperature, g_logp, g_ent)
    # outputs: fp32 math on the matmul result; the matmul itself runs in the input dtype, as eager does
    out_tol = 2e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(logp.double(), ref_logp, atol=out_tol, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=out_tol, rtol=0)
    pairs = [(leaves[0].grad, eager_gh, ref_gh), (leaves[1].grad, eager_gw, ref_gw)]
    if with_bias:
        pairs.append((b.grad, eager_gb, ref_gb))
    for ours, eager, ref in pairs:
        assert ours.dtype == dtype
        floor = 32 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
        assert max_err(ours, ref) <= 2 * max_err(eager, ref) + floor, (max_err(ours, ref), max_err(eager, ref))
    assert torch.all(leaves[0].grad[targets == -100] == 0)


def spy_chunk_buffers(monkeypatch):
    """Records the data pointer of every [m, V] logits buffer the PyTorch path fills (forward, then recomputes)."""
    calls = []
    original = ops_logprobs._head_logits_into

    def spy(h, weight, bias, inv_temperature, out, softcap=None):
        calls.append(out.data_ptr())
        return original(h, weight, bias, inv_temperature, out, softcap)

    monkeypatch.setattr(ops_logprobs, "_head_logits_into", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("cache", ["none", "some", "all"])
@pytest.mark.parametrize("n, h, v, chunk", [(41, 24, 1271, 6), (9, 8, 151936, 4)])
def test_cached_and_recomputed_chunks_match_float64(monkeypatch, n, h, v, chunk, cache, return_entropy, dtype):
    """The backward on log-probs kept from the forward and on recomputed chunks, alone and mixed."""
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    # the budget counts whole [chunk, V] buffers, the shorter last chunk's too: 2.0 keeps every chunk
    monkeypatch.setattr(ops_logprobs, "CACHE_FRACTION", {"none": 0.0, "some": 0.5, "all": 2.0}[cache])
    monkeypatch.setattr(ops_logprobs, "CACHE_MAX_BYTES", 1 << 40)
    calls = spy_chunk_buffers(monkeypatch)
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    bias = torch.randn(v).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.3] = -100
    targets[0] = 3  # at least one counted row
    temperature = 0.7
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                          return_entropy=return_entropy, chunk_size=chunk)
    logp, entropy = out if return_entropy else (out, None)
    g_logp = torch.randn(n)
    g_ent = torch.randn(n) if return_entropy else torch.zeros(n)
    (logp * g_logp + (0 if entropy is None else entropy * g_ent)).sum().backward()

    n_chunks = -(-int((targets != -100).sum()) // chunk)
    n_recomputed = len(calls) - n_chunks
    expected = {"none": n_chunks, "all": 0}.get(cache)
    assert n_recomputed == expected if expected is not None else 0 < n_recomputed < n_chunks
    ref_logp, ref_ent, *ref_grads = grads64(hidden, weight, bias, targets, temperature, g_logp, g_ent)
    eager_grads_ = eager_grads(hidden, weight, bias, targets, temperature, g_logp, g_ent)
    out_tol = 2e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(logp.double(), ref_logp, atol=out_tol, rtol=0)
    if return_entropy:
        torch.testing.assert_close(entropy.double(), ref_ent, atol=out_tol, rtol=0)
    for leaf, eager, ref in zip(leaves, eager_grads_, ref_grads, strict=True):
        assert leaf.grad.dtype == dtype
        floor = 32 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
        ours_err, eager_err = max_err(leaf.grad, ref), max_err(eager, ref)
        assert ours_err <= 2 * eager_err + floor, (ours_err, eager_err)
    assert torch.all(leaves[0].grad[targets == -100] == 0)


def test_cache_only_when_a_backward_can_follow(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    monkeypatch.setattr(ops_logprobs, "CACHE_FRACTION", 1.0)
    calls = spy_chunk_buffers(monkeypatch)
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    targets = torch.randint(0, 50, (20,))
    with torch.no_grad():
        linear_logprobs(hidden, weight, targets, chunk_size=4)
    assert len(calls) == 5 and len(set(calls)) == 1  # one reused buffer
    calls.clear()
    linear_logprobs(hidden.detach(), weight, targets, chunk_size=4)
    assert len(calls) == 5 and len(set(calls)) == 1
    calls.clear()
    linear_logprobs(hidden, weight, targets, chunk_size=4).sum().backward()
    assert len(calls) == 5  # every chunk kept by the forward (its own buffer), none recomputed


def test_second_backward_recomputes_what_the_first_used_up(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    monkeypatch.setattr(ops_logprobs, "CACHE_FRACTION", 0.5)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (30,))
    g = torch.randn(30)
    logp = linear_logprobs(hidden, weight, targets, temperature=1.3, chunk_size=7)
    logp.backward(g, retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    logp.backward(g)
    torch.testing.assert_close(hidden.grad, 2 * first[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad, 2 * first[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("v", [7, 1000, 32003])
def test_in_place_softmax_kernels_are_exact(v):
    # the PyTorch path runs (log_)softmax with out= its own input; a kernel that wrote before reading would differ
    z = torch.randn(33, v) * 4
    z[:, : v // 3] = float("-inf") if v > 7 else z[:, : v // 3]
    for fn in (torch.log_softmax, torch.softmax):
        x = z.clone()
        fn(x, dim=1, out=x)
        assert torch.equal(x, fn(z, dim=1))


def test_leading_shape_and_equivalence_with_token_logprobs(backend):
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :4] = -100  # prompt tokens
    logp = linear_logprobs(hidden, weight, targets, chunk_size=4)
    assert logp.shape == (2, 9)
    expected = token_logprobs(hidden @ weight.t(), targets)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)


def test_all_rows_ignored_gives_zero_and_zero_grads(backend):
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    logp = linear_logprobs(hidden, weight, torch.full((5,), -100), bias=bias)
    logp.sum().backward()
    assert torch.all(logp == 0)
    for t in (hidden, weight, bias):
        assert torch.all(t.grad == 0)


def test_frozen_weight_gets_no_grad(backend):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(21, 8)  # e.g. a frozen LM head
    logp = linear_logprobs(hidden, weight, torch.randint(0, 21, (6,)))
    logp.sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_autocast_bf16(monkeypatch):
    """Under autocast on the tensors' device (the CPU here, cuda under `make gpu-check`)."""
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (12,))
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        logp = linear_logprobs(hidden, weight, targets, chunk_size=5)
    logp.sum().backward()
    assert logp.dtype == torch.float32
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    ref = reference64(hidden.detach().bfloat16(), weight.detach().bfloat16(), None, targets)[0]
    torch.testing.assert_close(logp.double(), ref, atol=0.1, rtol=0)


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 5, 0, 2])

    def fn(h, w, b):
        logp, entropy = linear_logprobs(h, w, targets, bias=b, temperature=1.5, return_entropy=True, chunk_size=2)
        return logp.double(), entropy.double()

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((torch.randn(3, 8), torch.randn(10, 7), torch.zeros(3, dtype=torch.long)), {}, ValueError, "weight"),
        ((torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)), dict(bias=torch.randn(9)),
         ValueError, "bias"),
        ((torch.randn(3, 8), torch.randn(10, 8).double(), torch.zeros(3, dtype=torch.long)), {}, TypeError,
         "dtype"),
        ((torch.randn(3, 8), torch.randn(10, 8), torch.tensor([0, 10, 1])), {}, ValueError, "found 10"),
        ((torch.randn(3, 8), torch.randn(10, 8), torch.zeros(2, dtype=torch.long)), {}, ValueError,
         "targets shape"),
        ((torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)), dict(chunk_size=0), ValueError,
         "chunk_size"),
    ],
)
def test_bad_input_is_named(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        linear_logprobs(*args, **kwargs)
