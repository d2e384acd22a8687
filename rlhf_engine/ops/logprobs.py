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

# NOTE: the PyTorch path works on row chunks of about this many fp32 elements (64 MiB): large enough for
# efficient matmuls (K = chunk rows in the weight gradient), small enough that the reused [chunk, V] buffer stays
# far below the [N, V] logits.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# NOTE: linear_logprobs' forward keeps the fp32 log-probs of its last chunks for the backward, which then skips
# their recompute (one matmul of four). Bounded in bytes, whole chunks only: at most CACHE_FRACTION of the fp32
# [M, V] log-probs of the M counted rows and at most CACHE_MAX_BYTES (0 turns it off). The naive path peaks at
# about three [M, V] fp32 tensors; 3/16 of one leaves the weight gradient and the work buffers under 1/8 of that
# (the entropy adds one scratch chunk).
CACHE_FRACTION = 3 / 16
CACHE_MAX_BYTES = 256 << 20


def _chunk_rows(n_rows: int, n_cols: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size``, else about DEFAULT_CHUNK_ELEMENTS elements, even over the chunks."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    n_chunks = max(1, -(-n_rows // max(1, DEFAULT_CHUNK_ELEMENTS // max(1, n_cols))))
    return max(1, -(-n_rows // n_chunks))


# ----------------------------------------------------------------------------------------------------------------
# PyTorch chunk math: fp32, in place on [m, V] chunk buffers
# ----------------------------------------------------------------------------------------------------------------
# NOTE: on 2 shared cores each parallel op (over ~32K elements) may wait a scheduler slice (~5 ms) for its second
# thread, so the loops keep them few: fused (log_)softmax kernels rather than sub/exp passes, [m, H] row scales
# applied once over all rows, and the [m, V] chunk never scaled by the upstream gradient.
def _tempered_into(x, inv_temperature, out, softcap=None):
    """out [m, V] fp32 <- x [m, V] (any float dtype) * inv_temperature, or with ``softcap`` = (pre, post)
    post * tanh(pre * x); returns out."""
    if softcap is not None:
        pre, post = softcap
        torch.mul(x, pre, out=out) if x.dtype == torch.float32 else out.copy_(x).mul_(pre)
        return out.tanh_().mul_(post)
    if x.dtype == torch.float32 and inv_temperature != 1.0:
        return torch.mul(x, inv_temperature, out=out)
    out.copy_(x)
    return out.mul_(inv_temperature) if inv_temperature != 1.0 else out


def _softcap_factor_into(z, softcap, out):
    """out [m, V] <- 1 - tanh^2 = 1 - (z / post)^2 for the soft-capped z of ``_tempered_into``: with the row scale
    logit_scale / T, d z / d x = row scale * out."""
    return torch.div(z, softcap[1], out=out).square_().neg_().add_(1.0)


def _head_logits_into(h, weight, bias, inv_temperature, out, softcap=None):
    """out [m, V] fp32 <- (h [m, H] @ weight.T + bias) * inv_temperature (with ``softcap``: the transform of
    ``_tempered_into``); the matmul runs in h's dtype."""
    if h.dtype != torch.float32:
        return _tempered_into(F.linear(h, weight, bias), inv_temperature, out, softcap)
    if softcap is not None:
        return _head_logits_into(h, weight, bias, softcap[0], out).tanh_().mul_(softcap[1])
    if bias is None and inv_temperature == 1.0:
        return torch.mm(h, weight.t(), out=out)
    # NOTE: the temperature rides on the GEMM's alpha/beta; beta=0 ignores out's old contents (NaN included).
    beta = 0.0 if bias is None else inv_temperature
    return torch.addmm(out if bias is None else bias, h, weight.t(), beta=beta, alpha=inv_temperature, out=out)


def _log_softmax_into(z, targets, out):
    """out [m, V] <- log_softmax(z [m, V] fp32) (out may be z). Returns (logp[target], lse), [m] fp32 each."""
    rows = targets[:, None]
    z_target = z.gather(1, rows).squeeze(1)
    # NOTE: in place (out=z) is exact: the fused CPU kernel reads each row (max, sum exp) before writing it.
    torch.log_softmax(z, dim=1, out=out)
    logp = out.gather(1, rows).squeeze(1)
    return logp, z_target - logp


def _entropy(logp, aux):
    """-sum_j p_j log p_j [m] of the log-probs [m, V] (aux: scratch), with 0 log 0 = 0 (log p = -inf there)."""
    return -torch.exp(logp, out=aux).mul_(logp).nan_to_num_(nan=0.0).sum(1)


def _dlogits_(x, targets, g, g_ent, aux):
    """In place on x [m, V], which holds p (g_ent None) or log p: returns q [m, V] with

        d(g logp[target] + g_ent entropy) / dz = -r[:, None] q,   r = g (g_ent None) or 1 (see ``_row_scale``)

    Without g_ent, q = p - onehot: the row scale g stays off the [m, V] chunk. With it, q = g_ent p log p +
    (g + g_ent H) p - g onehot, the entropy H recomputed from this log p: rounding shifts every log p alike, and
    log p + H cancels it.
    """
    rows = targets[:, None]
    if g_ent is None:
        return x.scatter_add_(1, rows, torch.full_like(g[:, None], -1.0))
    p = torch.exp(x, out=aux)
    q = x.mul_(p).nan_to_num_(nan=0.0)  # p log p, 0 where p == 0
    c = g - g_ent * q.sum(1)  # g + g_ent H
    return q.mul_(g_ent[:, None]).addcmul_(p, c[:, None]).scatter_add_(1, rows, -g[:, None])


def _row_scale(g, g_ent, inv_temperature):
    """s [m]: d loss / d logits = s[:, None] * q for the q of ``_dlogits_``."""
    return g * -inv_temperature if g_ent is None else torch.full_like(g, -inv_temperature)


def _torch_rows_forward(logits, targets, inv_temperature, ignore_index, return_entropy, chunk_rows=None,
                        softcap=None):
    """logits [N, V], targets [N] -> (logp [N], lse [N], entropy [N] or None), fp32."""
    n_rows, n_cols = logits.shape
    chunk_rows = _chunk_rows(n_rows, n_cols, chunk_rows)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    # NOTE: one fp32 buffer (and one entropy scratch) for all chunks: a fresh [chunk, V] tensor is fresh pages,
    # faulted in at every chunk.
    buf = torch.empty((chunk_rows, n_cols), dtype=torch.float32, device=logits.device)
    aux = torch.empty_like(buf) if return_entropy else None
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(n_rows, start + chunk_rows))
        z, out = logits[rows], buf[: rows.stop - start]
        if z.dtype != torch.float32 or inv_temperature != 1.0 or softcap is not None:
            z = _tempered_into(z, inv_temperature, out, softcap)
        logp[rows], lse[rows] = _log_softmax_into(z, safe_targets[rows], out)
        if return_entropy:
            entropy[rows] = _entropy(out, aux[: rows.stop - start])
    logp.masked_fill_(~valid, 0.0)
    if entropy is not None:
        entropy.masked_fill_(~valid, 0.0)
    return logp, lse, entropy


def _torch_rows_backward(
    logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, chunk_rows=None,
    softcap=None,
):
    """Gradient w.r.t. logits [N, V] in the logits' dtype (0 on ignored rows); p is recomputed per chunk."""
    n_rows, n_cols = logits.shape
    chunk_rows = _chunk_rows(n_rows, n_cols, chunk_rows)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    g = torch.where(valid, grad_logp, 0.0)
    g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy, 0.0)
    s = _row_scale(g, g_ent, inv_temperature)
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    # NOTE: an fp32 gradient is built in its own rows; other dtypes go through one reused fp32 buffer.
    fp32 = grad_logits.dtype == torch.float32
    shape = (chunk_rows, n_cols)
    buf = None if fp32 else torch.empty(shape, dtype=torch.float32, device=logits.device)
    aux = None if g_ent is None else torch.empty(shape, dtype=torch.float32, device=logits.device)
    factor = None if softcap is None else torch.empty(shape, dtype=torch.float32, device=logits.device)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(n_rows, start + chunk_rows))
        m = rows.stop - start
        z, out = logits[rows], grad_logits[rows] if fp32 else buf[:m]
        if z.dtype != torch.float32 or inv_temperature != 1.0 or softcap is not None:
            z = _tempered_into(z, inv_temperature, out, softcap)
        if softcap is not None:
            _softcap_factor_into(z, softcap, factor[:m])
        # p, or log p for the entropy term; one fused kernel either way
        (torch.softmax if g_ent is None else torch.log_softmax)(z, dim=1, out=out)
        q = _dlogits_(out, safe_targets[rows], g[rows], None if g_ent is None else g_ent[rows],
                      None if aux is None else aux[:m])
        q.mul_(s[rows, None])
        if softcap is not None:
            q.mul_(factor[:m])
        if not fp32:
            grad_logits[rows].copy_(q)
    return grad_logits


# ----------------------------------------------------------------------------------------------------------------
# Backend-agnostic row forward/backward
# ----------------------------------------------------------------------------------------------------------------
def _triton_rows_forward(logits, targets, inv_temperature, ignore_index, return_entropy, chunk_rows=None,
                         softcap=None):
    from rlhf_engine.kernels import logprobs as kernels

    return kernels.token_logprobs_forward(logits, targets, inv_temperature, ignore_index, return_entropy, softcap)


def _triton_rows_backward(
    logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, chunk_rows=None,
    inplace=False, softcap=None,
):
    from rlhf_engine.kernels import logprobs as kernels

    return kernels.token_logprobs_backward(
        logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, inplace=inplace,
        softcap=softcap,
    )


_ROWS_FORWARD = {"torch": _torch_rows_forward, "triton": _triton_rows_forward}
_ROWS_BACKWARD = {"torch": _torch_rows_backward, "triton": _triton_rows_backward}


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, ignore_index, return_entropy, op_name, softcap):
        # logits [N, V] (last dim contiguous), targets [N] int64
        backend, (logp, lse, entropy) = _dispatch.run(
            op_name, (logits, targets), _ROWS_FORWARD, logits, targets, inv_temperature, ignore_index, return_entropy,
            softcap=softcap,
        )
        ctx.backend, ctx.inv_temperature, ctx.ignore_index = backend, inv_temperature, ignore_index
        ctx.softcap = softcap
        ctx.op_name = op_name
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, lse, entropy)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grad_logits = _dispatch.launch(
            f"{ctx.op_name} (backward)", ctx.backend, (logits, targets), _ROWS_BACKWARD[ctx.backend],
            logits, targets, lse, entropy, grad_logp.float().contiguous(), grad_entropy, ctx.inv_temperature,
            ctx.ignore_index, softcap=ctx.softcap,
        )
        return grad_logits, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# linear_logprobs: the chunked LM head
# ----------------------------------------------------------------------------------------------------------------
def _head_grads(q, hs, s, weight, grad_h, grad_w, grad_b):
    """One chunk's LM-head gradients, with d loss / d(h W^T + b) = s[:, None] * q (s [m] fp32, None: 1).

    q [m, V] (fp32, or the weight's dtype), hs = s[:, None] * h [m, H]. Writes grad_h [m, H] fp32 = q @ W (the
    caller scales it by s); adds q^T hs to grad_w [V, H] and q^T s to grad_b [V], both fp32. Each may be None
    (not needed). The matmuls run in the weight's dtype, as eager's do.
    """
    if weight.dtype == torch.float32 and q.dtype == torch.float32:
        if grad_h is not None:
            torch.mm(q, weight, out=grad_h)
        if grad_w is not None:
            grad_w.addmm_(q.t(), hs)
    else:
        q_mm = q.to(weight.dtype)
        if grad_h is not None:
            grad_h.copy_(q_mm @ weight)
        if grad_w is not None:
            grad_w += (q_mm.t() @ hs).float()
    if grad_b is not None:
        if s is None:
            grad_b += q.float().sum(0)
        else:
            grad_b.addmv_(q.t(), s)


class _LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, inv_temperature, ignore_index, return_entropy, chunk_size, keep, op_name,
        softcap,
    ):
        # hidden [N, H], weight [V, H], bias [V] or None, targets [N] int64; keep: a backward may follow
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        logp = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp) if return_entropy else None
        # NOTE: only rows that count are multiplied by the LM head; in SFT most prompt rows are ignored.
        valid_idx = (targets != ignore_index).nonzero().squeeze(1)
        all_valid = valid_idx.numel() == n_rows
        h = hidden if all_valid else hidden.index_select(0, valid_idx)  # [M, H]
        t = targets if all_valid else targets.index_select(0, valid_idx)  # [M]
        n_valid = h.shape[0]
        chunk_rows = _chunk_rows(n_valid, vocab_size, chunk_size)
        bounds = [(start, min(n_valid, start + chunk_rows)) for start in range(0, n_valid, chunk_rows)]
        backend, _ = _dispatch.select_backend(op_name, hidden, weight)
        torch_path = backend == "torch"
        chunk_bytes = chunk_rows * vocab_size * 4
        # (soft-capping needs tanh in the backward, which log p does not give back: no cache then)
        cached = keep and torch_path and softcap is None
        budget = min(CACHE_MAX_BYTES, CACHE_FRACTION * n_valid * vocab_size * 4) if cached else 0
        first_cached = len(bounds) - min(len(bounds), int(budget // chunk_bytes))
        logp_v = torch.empty(n_valid, dtype=torch.float32, device=hidden.device)
        lse_v = torch.empty_like(logp_v)
        ent_v = torch.empty_like(logp_v) if return_entropy else None
        shape = (chunk_rows, vocab_size)
        aux = torch.empty(shape, dtype=torch.float32, device=h.device) if return_entropy and torch_path else None
        buf, cache = None, []
        for i, (start, end) in enumerate(bounds):
            rows = slice(start, end)
            if not torch_path:
                logits_c = F.linear(h[rows], weight, bias)  # [m, V]
                logp_v[rows], lse_v[rows], ent_c = _dispatch.launch(
                    op_name, backend, (hidden, weight), _triton_rows_forward,
                    logits_c, t[rows], inv_temperature, ignore_index, return_entropy, softcap=softcap,
                )
            else:
                buf = torch.empty(shape, dtype=torch.float32, device=h.device) if buf is None else buf
                z = _head_logits_into(h[rows], weight, bias, inv_temperature, buf[: end - start], softcap)
                logp_v[rows], lse_v[rows] = _log_softmax_into(z, t[rows], z)
                ent_c = _entropy(z, aux[: end - start]) if return_entropy else None
                if i >= first_cached:
                    cache.append(buf)  # this chunk's log p, for the backward; the next chunk takes a fresh buffer
                    buf = None
            if return_entropy:
                ent_v[rows] = ent_c
        logp.index_copy_(0, valid_idx, logp_v)
        if return_entropy:
            entropy.index_copy_(0, valid_idx, ent_v)
        ctx.backend, ctx.bounds, ctx.cache, ctx.n_rows, ctx.op_name = backend, bounds, cache, n_rows, op_name
        ctx.inv_temperature, ctx.ignore_index, ctx.has_bias = inv_temperature, ignore_index, bias is not None
        ctx.softcap = softcap
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, weight, bias, t, valid_idx, lse_v, ent_v)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        h, weight, bias, t, valid_idx, lse_v, ent_v = ctx.saved_tensors
        cache, ctx.cache = ctx.cache, []  # used up in place: a second backward (retain_graph) recomputes
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 11
        n_valid, vocab_size = h.shape[0], weight.shape[0]
        invt, torch_path, bounds = ctx.inv_temperature, ctx.backend == "torch", ctx.bounds
        g = torch.zeros(n_valid, dtype=torch.float32, device=h.device)
        if grad_logp is not None:
            g = grad_logp.float().index_select(0, valid_idx)
        g_ent = None if grad_entropy is None else grad_entropy.float().index_select(0, valid_idx)
        # d loss / d(h W^T + b) = s[:, None] * q: the Triton kernel's q is the whole of it (s = 1)
        s = _row_scale(g, g_ent, invt) if torch_path else None
        hs = (h if s is None else (h.float() * s[:, None]).to(h.dtype)) if need_w else None  # [M, H]
        # weight/bias gradients accumulate in fp32 whatever the input dtype; so does grad_h where s scales it (once)
        h_dtype = torch.float32 if torch_path else h.dtype
        grad_h = torch.empty(h.shape, dtype=h_dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab_size, dtype=torch.float32, device=weight.device) if need_b else None
        shape = (bounds[0][1] if bounds else 0, vocab_size)
        aux = torch.empty(shape, dtype=torch.float32, device=h.device) if g_ent is not None and torch_path else None
        softcap = ctx.softcap
        factor = torch.empty(shape, dtype=torch.float32, device=h.device) if softcap and torch_path else None
        first_cached = len(bounds) - len(cache)
        buf = None
        # NOTE: the cached chunks go first (last chunk first): each one, once used, becomes the work buffer.
        for i in reversed(range(len(bounds))):
            start, end = bounds[i]
            rows = slice(start, end)
            g_ent_c = None if g_ent is None else g_ent[rows]
            if not torch_path:
                # NOTE: the logits chunk is recomputed (one extra matmul) instead of kept: that is the memory win.
                q = _dispatch.launch(
                    f"{ctx.op_name} (backward)", ctx.backend, (h, weight), _triton_rows_backward,
                    F.linear(h[rows], weight, bias), t[rows], lse_v[rows], None if ent_v is None else ent_v[rows],
                    g[rows], g_ent_c, invt, ctx.ignore_index, inplace=True, softcap=softcap,
                )  # d loss / d logits [m, V], the logits' dtype
            else:
                if i >= first_cached:
                    buf = cache.pop()
                    x = buf[: end - start]  # log p, from the forward
                    if g_ent is None:
                        x.exp_()
                else:
                    buf = torch.empty(shape, dtype=torch.float32, device=h.device) if buf is None else buf
                    x = _head_logits_into(h[rows], weight, bias, invt, buf[: end - start], softcap)
                    if softcap is not None:
                        _softcap_factor_into(x, softcap, factor[: end - start])
                    # p, or log p for the entropy term; one fused kernel either way
                    (torch.softmax if g_ent is None else torch.log_softmax)(x, dim=1, out=x)
                q = _dlogits_(x, t[rows], g[rows], g_ent_c, None if aux is None else aux[: end - start])
                if softcap is not None:
                    q.mul_(factor[: end - start])
            _head_grads(q, None if hs is None else hs[rows], None if s is None else s[rows], weight,
                        None if grad_h is None else grad_h[rows], grad_w, grad_b)
        grad_hidden = None
        if need_h:
            grad_h = (grad_h if s is None else grad_h.mul_(s[:, None])).to(h.dtype)
            if n_valid == ctx.n_rows:
                grad_hidden = grad_h
            else:
                grad_hidden = grad_h.new_zeros((ctx.n_rows, h.shape[1])).index_copy_(0, valid_idx, grad_h)
        grad_weight = grad_w.to(weight.dtype) if need_w else None
        grad_bias = grad_b.to(bias.dtype) if (need_b and ctx.has_bias) else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _check_temperature(op: str, temperature) -> float:
    if not isinstance(temperature, (int, float)) or not (temperature > 0.0) or temperature == float("inf"):
        raise ValueError(f"{op}: temperature must be a finite number > 0, found {temperature!r}")
    return 1.0 / float(temperature)


def _logit_transform(op: str, temperature, softcap, logit_scale) -> tuple[float, tuple[float, float] | None]:
    """(logit_scale / T, None) or, with soft-capping, (logit_scale / T, (logit_scale / cap, cap / T))."""
    inv_temperature = _check_temperature(op, temperature)
    for name, value in (("logit_scale", logit_scale), ("softcap", 1.0 if softcap is None else softcap)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value < float("inf")):
            raise ValueError(f"{op}: {name} must be a finite number > 0 (or softcap None: no cap), found {value!r}")
    scaled = float(logit_scale) * inv_temperature
    if softcap is None:
        return scaled, None
    return scaled, (float(logit_scale) / float(softcap), float(softcap) * inv_temperature)


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
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits / temperature)[..., target]`` per position, without materialising the log-softmax.

    Math, with z = logit_scale * logits / temperature, or with ``softcap`` (final logit soft-capping, Gemma 2)
    z = softcap * tanh(logit_scale * logits / softcap) / temperature, and p = softmax(z) over the last dimension:
        logp    = z[target] - logsumexp(z)
        entropy = -sum_v p_v log p_v                       (only with ``return_entropy``)

    Shapes: logits [..., V] (fp32, bf16 or fp16), targets [...] integer ids in [0, V) or ``ignore_index``.
    Returns logp [...] fp32, or ``(logp, entropy)``, both [...] fp32, with ``return_entropy``. Positions whose
    target equals ``ignore_index`` give 0 in both outputs and no gradient. Differentiable w.r.t. logits through
    both outputs. ``temperature`` must be a finite number > 0.
    """
    op = "token_logprobs"
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        found = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{op}: logits must be a floating tensor (fp32, bf16 or fp16), found {found}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have shape [..., V] with V >= 1, found {tuple(logits.shape)}")
    inv_temperature, cap = _logit_transform(op, temperature, softcap, logit_scale)
    vocab_size = logits.shape[-1]
    _check_targets(op, targets, logits.shape[:-1], vocab_size, ignore_index)
    if targets.device != logits.device:
        raise ValueError(f"{op}: targets on {targets.device} but logits on {logits.device}; move them together")
    lead_shape = logits.shape[:-1]
    logits2d = logits.reshape(-1, vocab_size)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    targets1d = targets.reshape(-1).to(torch.int64).contiguous()  # the kernels index it by row
    out = _TokenLogprobsFunction.apply(logits2d, targets1d, inv_temperature, ignore_index, return_entropy, op, cap)
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
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs of ``hidden @ weight.T + bias`` without ever holding the [N, V] logits.

    Math: logits = hidden weight^T + bias, then exactly ``token_logprobs(logits, targets, ...)``:
        logp    = z[target] - logsumexp(z),  z = logit_scale * logits / temperature, or with ``softcap``
                                             z = softcap * tanh(logit_scale * logits / softcap) / temperature
        entropy = -sum_v p_v log p_v,        p = softmax(z)   (only with ``return_entropy``)

    Shapes: hidden [..., H], weight [V, H] (the LM head), bias [V] or None, targets [...] integer ids in [0, V)
    or ``ignore_index``; hidden, weight and bias share one dtype (or run under autocast, where the matmuls use
    the autocast dtype). Returns logp [...] fp32, or ``(logp, entropy)``, both [...] fp32. Ignored positions
    give 0 and no gradient. Gradients flow to hidden, weight and bias.
    Rows whose target is ``ignore_index`` are dropped before the LM head; the M others go ``chunk_size`` rows at
    a time (default: about ``DEFAULT_CHUNK_ELEMENTS`` logits per chunk, evenly split). The backward recomputes
    each chunk's logits, except for the last chunks whose fp32 log-probs the forward kept: at most
    ``CACHE_FRACTION`` of the [M, V] fp32 log-probs and ``CACHE_MAX_BYTES``, and only when a backward can follow.
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
    inv_temperature, cap = _logit_transform(op, temperature, softcap, logit_scale)
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
    targets1d = targets.reshape(-1).to(torch.int64).contiguous()  # the kernels index it by row
    # the cache is for a backward: none under no_grad or when nothing needs a gradient
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    with torch.autocast(device_type, enabled=False):
        out = _LinearLogprobsFunction.apply(
            hidden2d, weight, bias, targets1d, inv_temperature, ignore_index, return_entropy, chunk_size, keep, op,
            cap,
        )
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


def token_logprobs_reference(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                             softcap=None, logit_scale=1.0):
    """The plain eager composition (materialises the fp32 log-softmax): the baseline and the test oracle."""
    z = logits.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).nan_to_num(nan=0.0).sum(-1) * valid
    return logp, entropy
