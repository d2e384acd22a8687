"""Token log-probs and entropy: ``token_logprobs`` (from logits) and ``linear_logprobs`` (from the last hidden
state and the LM head, never materialising the [N, V] logits).

Math, with z = logits / T and p = softmax(z):
    logp    = z[target] - logsumexp(z)
    entropy = -sum_j p_j log p_j
    d logp / d logits    = (onehot - p) / T
    d entropy / d logits = -p (log p + entropy) / T

Layering: public function (validation, autocast, reshape) -> ``torch.autograd.Function`` -> per-backend row
implementation (``kernels/logprobs.py`` on Triton, the chunked functions below on PyTorch). The plain eager
composition is ``token_logprobs_reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_engine.ops import _dispatch

# NOTE: the PyTorch path works on row chunks of about this many fp32 elements (64 MiB): large enough for an
# efficient matmul, small enough that the transient [chunk, V] buffers stay far below the [N, V] logits.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, n_cols))


# ----------------------------------------------------------------------------------------------------------------
# PyTorch row implementations (chunked over rows; fp32 math)
# ----------------------------------------------------------------------------------------------------------------
def _torch_rows_forward(logits, targets, inv_temperature, ignore_index, return_entropy, chunk_rows=None):
    """logits [N, V], targets [N] -> (logp [N], lse [N], entropy [N] or None), fp32."""
    n_rows, n_cols = logits.shape
    chunk_rows = _chunk_rows(n_cols, chunk_rows)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)[:, None]
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    for start in range(0, n_rows, chunk_rows):
        end = min(n_rows, start + chunk_rows)
        z = logits[start:end].float()
        if inv_temperature != 1.0:
            z = z * inv_temperature
        # NOTE: log_softmax is one fused, vectorised kernel; logsumexp is several passes on CPU.
        log_p = torch.log_softmax(z, dim=-1)
        logp_c = log_p.gather(1, safe_targets[start:end]).squeeze(1)
        logp[start:end] = logp_c
        lse[start:end] = z.gather(1, safe_targets[start:end]).squeeze(1) - logp_c
        if return_entropy:
            # p log p, with 0 log 0 = 0 (log p is -inf for masked vocabulary entries)
            entropy[start:end] = -log_p.exp().mul_(log_p).nan_to_num_(nan=0.0).sum(-1)
    logp.masked_fill_(~valid, 0.0)
    lse.masked_fill_(~valid, 0.0)
    if entropy is not None:
        entropy.masked_fill_(~valid, 0.0)
    return logp, lse, entropy


def _grad_logits(z, safe_targets, lse, entropy, g, g_ent, inv_temperature, owned):
    """d(sum g logp + g_ent entropy) / d logits for the fp32 chunk ``z`` of raw logits, fp32.

    ``g`` and ``g_ent`` must already be 0 on ignored rows (their rows then come out 0). With ``owned`` the chunk
    may be overwritten.
    """
    if inv_temperature != 1.0:
        z = z.mul_(inv_temperature) if owned else z * inv_temperature
    if g_ent is None:
        grad = torch.softmax(z, dim=-1).mul_(-g[:, None])  # -g p
    else:
        # NOTE: log p from log_softmax, not z - lse: the difference loses bits that the entropy term needs.
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        # -g_ent p (log p + H), where p == 0 gives 0 (log p may be -inf). H is recomputed from this log p rather
        # than taken from the forward: log_softmax's rounding shifts every log p alike, and log p + H cancels it.
        grad = log_p.mul_(p).nan_to_num_(nan=0.0)
        grad.addcmul_(p, -grad.sum(-1, keepdim=True)).mul_(-g_ent[:, None])
        grad.sub_(p.mul_(g[:, None]))
    grad.scatter_add_(1, safe_targets[:, None], g[:, None])  # + g onehot
    if inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return grad


def _torch_rows_backward(
    logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, chunk_rows=None,
    inplace=False,
):
    """Gradient w.r.t. logits [N, V] in the logits' dtype; with ``inplace`` the chunk buffers of ``logits`` may be
    reused (its contents are then lost)."""
    n_rows, n_cols = logits.shape
    chunk_rows = _chunk_rows(n_cols, chunk_rows)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    g = torch.where(valid, grad_logp, 0.0)
    g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy, 0.0)
    if inplace and n_rows <= chunk_rows and logits.dtype == torch.float32:
        return _grad_logits(logits, safe_targets, lse, entropy, g, g_ent, inv_temperature, owned=True)
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    for start in range(0, n_rows, chunk_rows):
        end = min(n_rows, start + chunk_rows)
        rows = slice(start, end)
        z = logits[rows]
        owned = z.dtype != torch.float32
        grad_logits[rows] = _grad_logits(
            z.float(),
            safe_targets[rows],
            lse[rows],
            None if entropy is None else entropy[rows],
            g[rows],
            None if g_ent is None else g_ent[rows],
            inv_temperature,
            owned=owned,
        )
    return grad_logits


# ----------------------------------------------------------------------------------------------------------------
# Backend-agnostic row forward/backward
# ----------------------------------------------------------------------------------------------------------------
def _triton_rows_forward(logits, targets, inv_temperature, ignore_index, return_entropy, chunk_rows=None):
    from rlhf_engine.kernels import logprobs as kernels

    return kernels.token_logprobs_forward(logits, targets, inv_temperature, ignore_index, return_entropy)


def _triton_rows_backward(
    logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, chunk_rows=None,
    inplace=False,
):
    from rlhf_engine.kernels import logprobs as kernels

    return kernels.token_logprobs_backward(
        logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, inplace=inplace
    )


_ROWS_FORWARD = {"torch": _torch_rows_forward, "triton": _triton_rows_forward}
_ROWS_BACKWARD = {"torch": _torch_rows_backward, "triton": _triton_rows_backward}


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, ignore_index, return_entropy, op_name):
        # logits [N, V] (last dim contiguous), targets [N] int64
        backend, (logp, lse, entropy) = _dispatch.run(
            op_name,
            (logits, targets),
            _ROWS_FORWARD,
            logits,
            targets,
            inv_temperature,
            ignore_index,
            return_entropy,
        )
        ctx.backend = backend
        ctx.inv_temperature = inv_temperature
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, lse, entropy)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logits = _ROWS_BACKWARD[ctx.backend](
            logits,
            targets,
            lse,
            entropy,
            grad_logp.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(),
            ctx.inv_temperature,
            ctx.ignore_index,
        )
        return grad_logits, None, None, None, None, None


class _LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, ignore_index, return_entropy, chunk_rows, op_name):
        # hidden [N, H], weight [V, H], bias [V] or None, targets [N] int64
        n_rows = hidden.shape[0]
        logp = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp) if return_entropy else None
        # NOTE: only rows that count are multiplied by the LM head; in SFT most prompt rows are ignored.
        valid_idx = (targets != ignore_index).nonzero().squeeze(1)
        all_valid = valid_idx.numel() == n_rows
        h = hidden if all_valid else hidden.index_select(0, valid_idx)  # [M, H]
        t = targets if all_valid else targets.index_select(0, valid_idx)  # [M]
        n_valid = h.shape[0]
        lse_v = torch.empty(n_valid, dtype=torch.float32, device=hidden.device)
        ent_v = torch.empty_like(lse_v) if return_entropy else None
        logp_v = torch.empty_like(lse_v)
        backend, _ = _dispatch.select_backend(op_name, hidden, weight)
        rows_forward = _ROWS_FORWARD[backend]
        for start in range(0, n_valid, chunk_rows):
            end = min(n_valid, start + chunk_rows)
            logits_c = F.linear(h[start:end], weight, bias)  # [m, V]
            lp_c, lse_c, ent_c = rows_forward(logits_c, t[start:end], inv_temperature, ignore_index, return_entropy)
            logp_v[start:end] = lp_c
            lse_v[start:end] = lse_c
            if return_entropy:
                ent_v[start:end] = ent_c
        logp.index_copy_(0, valid_idx, logp_v)
        if return_entropy:
            entropy.index_copy_(0, valid_idx, ent_v)
        ctx.backend = backend
        ctx.inv_temperature = inv_temperature
        ctx.ignore_index = ignore_index
        ctx.chunk_rows = chunk_rows
        ctx.n_rows = n_rows
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, weight, bias, t, valid_idx, lse_v, ent_v)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        h, weight, bias, t, valid_idx, lse_v, ent_v = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        g = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        if grad_logp is not None:
            g = grad_logp.float().index_select(0, valid_idx)
        g_ent = None if grad_entropy is None else grad_entropy.float().index_select(0, valid_idx)
        grad_h = torch.empty_like(h) if need_h else None
        # weight/bias gradients accumulate over chunks in fp32, whatever the input dtype
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        rows_backward = _ROWS_BACKWARD[ctx.backend]
        n_valid = h.shape[0]
        for start in range(0, n_valid, ctx.chunk_rows):
            end = min(n_valid, start + ctx.chunk_rows)
            h_c = h[start:end]
            # NOTE: the logits chunk is recomputed (one extra matmul) instead of kept: that is the memory win.
            logits_c = F.linear(h_c, weight, bias)  # [m, V]
            grad_c = rows_backward(
                logits_c,
                t[start:end],
                lse_v[start:end],
                None if ent_v is None else ent_v[start:end],
                g[start:end],
                None if g_ent is None else g_ent[start:end],
                ctx.inv_temperature,
                ctx.ignore_index,
                chunk_rows=end - start,
                inplace=True,
            )  # [m, V], the logits' dtype
            if need_h:
                torch.matmul(grad_c, weight, out=grad_h[start:end])
            if need_w:
                if grad_c.dtype == torch.float32:
                    grad_w.addmm_(grad_c.t(), h_c)
                else:
                    grad_w += (grad_c.t() @ h_c).float()
            if need_b:
                grad_b += grad_c.float().sum(0)
        grad_hidden = None
        if need_h:
            if h.shape[0] == ctx.n_rows:
                grad_hidden = grad_h
            else:
                grad_hidden = grad_h.new_zeros((ctx.n_rows, h.shape[1])).index_copy_(0, valid_idx, grad_h)
        grad_weight = grad_w.to(weight.dtype) if need_w else None
        grad_bias = grad_b.to(bias.dtype) if (need_b and ctx.has_bias) else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _check_temperature(op: str, temperature) -> float:
    if not isinstance(temperature, (int, float)) or not (temperature > 0.0) or temperature == float("inf"):
        raise ValueError(f"{op}: temperature must be a finite number > 0, found {temperature!r}")
    return 1.0 / float(temperature)


def _check_targets(op: str, targets: torch.Tensor, expected_shape, vocab_size: int, ignore_index: int):
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        found = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"{op}: targets must be an integer tensor of token ids, found {found}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(
            f"{op}: targets shape {tuple(targets.shape)} must equal the leading shape {tuple(expected_shape)}"
        )
    # NOTE: one device sync; an out-of-range id would otherwise read outside the row (or fault on GPU).
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if targets.numel() and bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"{op}: target ids must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {first} "
            f"({int(bad.sum())} such position(s))"
        )


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """``log_softmax(logits / temperature)[..., target]`` per position, without materialising the log-softmax.

    logits [..., V] (fp32/bf16/fp16), targets [...] integer. Returns logp [...] fp32, and entropy [...] fp32
    (``-sum p log p`` of the tempered distribution) when ``return_entropy``. Positions whose target equals
    ``ignore_index`` give 0 and no gradient. Differentiable w.r.t. logits (both outputs).
    """
    op = "token_logprobs"
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        found = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{op}: logits must be a floating tensor (fp32, bf16 or fp16), found {found}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have shape [..., V] with V >= 1, found {tuple(logits.shape)}")
    inv_temperature = _check_temperature(op, temperature)
    vocab_size = logits.shape[-1]
    _check_targets(op, targets, logits.shape[:-1], vocab_size, ignore_index)
    if targets.device != logits.device:
        raise ValueError(f"{op}: targets on {targets.device} but logits on {logits.device}; move them together")
    lead_shape = logits.shape[:-1]
    logits2d = logits.reshape(-1, vocab_size)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    targets1d = targets.reshape(-1).to(torch.int64)
    out = _TokenLogprobsFunction.apply(logits2d, targets1d, inv_temperature, ignore_index, return_entropy, op)
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
):
    """Token log-probs of ``hidden @ weight.T + bias`` without ever holding the [N, V] logits.

    hidden [..., H], weight [V, H] (the LM head), bias [V] or None, targets [...]. Same outputs as
    ``token_logprobs(F.linear(hidden, weight, bias), targets, ...)``; gradients for hidden, weight and bias.
    Rows are processed ``chunk_size`` at a time (default: about 8M logits per chunk); the backward recomputes
    each chunk's logits. Under autocast the matmuls run in the autocast dtype.
    """
    op = "linear_logprobs"
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            found = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{op}: {name} must be a floating tensor, found {found}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: expected hidden [..., H] and weight [V, H]; found hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    vocab_size, hidden_size = weight.shape
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab_size):
        raise ValueError(f"{op}: bias must have shape [{vocab_size}], found {tuple(bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int, found {chunk_size!r}")
    inv_temperature = _check_temperature(op, temperature)
    _check_targets(op, targets, hidden.shape[:-1], vocab_size, ignore_index)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(
            f"{op}: hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share one dtype; cast them or "
            f"run under torch.autocast"
        )
    lead_shape = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden_size)
    targets1d = targets.reshape(-1).to(torch.int64)
    chunk_rows = _chunk_rows(vocab_size, chunk_size)
    with torch.autocast(device_type, enabled=False):
        out = _LinearLogprobsFunction.apply(
            hidden2d, weight, bias, targets1d, inv_temperature, ignore_index, return_entropy, chunk_rows, op
        )
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


def token_logprobs_reference(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """The plain eager composition (materialises the fp32 log-softmax): the baseline and the test oracle."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).nan_to_num(nan=0.0).sum(-1) * valid
    return logp, entropy
