"""Token log-probs (and entropy) from logits without materialising the fp32 log-softmax.

Forward: one program walks a row of the vocabulary in BLOCK_V tiles with an online log-sum-exp
(running max m, running sum s = sum exp(z - m), and for the entropy t = sum exp(z - m) * z), so the row is read
once and nothing of size V is written. Backward: the row is read again and the gradient

    d logp / d logits_j   = (onehot_j - p_j) / T
    d H    / d logits_j   = -p_j (log p_j + H) / T          (H = entropy, z = logits / T)

is written straight into the gradient tensor (in the logits' dtype): no [N, V] fp32 buffer is ever kept.

Logit transforms are fused in both passes: z = x * s with s = logit_scale / T, or with final soft-capping
(Gemma 2) z = (cap / T) tanh(x logit_scale / cap), whose gradient carries the extra factor 1 - tanh^2.

Rows whose target equals ``ignore_index`` give 0 and a zero gradient row. Programs stride over rows, so any
number of rows fits in one launch (CUDA caps grid dimensions; see Liger-Kernel issue 1294).
"""

import torch
import triton
import triton.language as tl

# NOTE: one program per row up to this many programs; beyond it each program strides over rows. Stays under
# the 65,535 limit of CUDA's y/z grid dimensions even if a launch ever moves off axis 0.
MAX_PROGRAMS = 65535


@triton.jit
def _tanh(y):
    """tanh from one exp of a non-positive number: no overflow, exact sign, tanh(+-inf) = +-1."""
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0.0, -t, t)


@triton.jit
def _transform(x, inv_temperature, pre_scale, post_scale, SOFTCAP: tl.constexpr):
    """(z, dz/dx) of raw logits x (fp32): x * inv_temperature, or post_scale tanh(pre_scale x) with SOFTCAP."""
    # NOTE: the plain return under `else`: compiled Triton still generates the statements after an `if SOFTCAP:`
    # that returns, then refuses the two return types (block, block) and (block, scalar); the interpreter does not
    if SOFTCAP:
        t = _tanh(x * pre_scale)
        return t * post_scale, inv_temperature * (1.0 - t * t)
    else:
        return x * inv_temperature, inv_temperature


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,  # [N, V] fp32/bf16/fp16, last dim contiguous
    logits_row_stride,
    targets_ptr,  # [N] int64
    logp_ptr,  # [N] fp32 out: log softmax(logits / T)[target]
    lse_ptr,  # [N] fp32 out: logsumexp(logits / T), saved for the backward
    entropy_ptr,  # [N] fp32 out: -sum p log p (written only when RETURN_ENTROPY)
    n_rows,
    n_cols,
    inv_temperature,  # logit_scale / T: dz/dx without soft-capping
    pre_scale,  # logit_scale / cap (SOFTCAP)
    post_scale,  # cap / T (SOFTCAP)
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    for row in range(pid, n_rows, n_programs):
        target = tl.load(targets_ptr + row)
        if target == ignore_index:
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if RETURN_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
        else:
            row_ptr = logits_ptr + row * logits_row_stride
            m = -float("inf")
            s = 0.0
            t = 0.0
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
                z, _ = _transform(x, inv_temperature, pre_scale, post_scale, SOFTCAP)
                if SOFTCAP:  # the cap bounds -inf padding too: keep it out of the row
                    z = tl.where(cols < n_cols, z, -float("inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                # a row whose tiles so far are all -inf (masked tokens) keeps s = 0: exp(-inf - -inf) would be NaN
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                scale = tl.exp(m - m_safe)
                e = tl.exp(z - m_safe)
                s = s * scale + tl.sum(e, axis=0)
                if RETURN_ENTROPY:
                    # e == 0 where z == -inf (padding or a masked token): 0 * -inf must count as 0
                    t = t * scale + tl.sum(e * tl.where(e > 0.0, z, 0.0), axis=0)
                m = m_new
            lse = m + tl.log(s)
            z_target, _ = _transform(tl.load(row_ptr + target).to(tl.float32), inv_temperature, pre_scale,
                                     post_scale, SOFTCAP)
            tl.store(logp_ptr + row, z_target - lse)
            tl.store(lse_ptr + row, lse)
            if RETURN_ENTROPY:
                tl.store(entropy_ptr + row, lse - t / s)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,  # [N, V] fp32/bf16/fp16, last dim contiguous
    logits_row_stride,
    targets_ptr,  # [N] int64
    lse_ptr,  # [N] fp32, from the forward
    entropy_ptr,  # [N] fp32, from the forward (read only when HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # [N] fp32 upstream gradient of logp
    grad_entropy_ptr,  # [N] fp32 upstream gradient of the entropy (read only when HAS_GRAD_ENTROPY)
    grad_logits_ptr,  # [N, V] out, the logits' dtype, contiguous
    grad_row_stride,
    n_rows,
    n_cols,
    inv_temperature,
    pre_scale,
    post_scale,
    ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    for row in range(pid, n_rows, n_programs):
        target = tl.load(targets_ptr + row)
        row_ptr = logits_ptr + row * logits_row_stride
        grad_row_ptr = grad_logits_ptr + row * grad_row_stride
        if target == ignore_index:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
                tl.store(grad_row_ptr + cols, zeros.to(grad_logits_ptr.dtype.element_ty), mask=cols < n_cols)
        else:
            lse = tl.load(lse_ptr + row)
            g = tl.load(grad_logp_ptr + row)
            if HAS_GRAD_ENTROPY:
                g_ent = tl.load(grad_entropy_ptr + row)
                entropy = tl.load(entropy_ptr + row)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                col_mask = cols < n_cols
                x = tl.load(row_ptr + cols, mask=col_mask, other=-float("inf")).to(tl.float32)
                z, dz = _transform(x, inv_temperature, pre_scale, post_scale, SOFTCAP)
                log_p = z - lse
                p = tl.exp(log_p)
                grad = tl.where(cols == target, g, 0.0) - g * p
                if HAS_GRAD_ENTROPY:
                    # p log p = 0 where p == 0 (log p may be -inf there)
                    grad -= g_ent * p * (tl.where(p > 0.0, log_p, 0.0) + entropy)
                grad = grad * dz
                tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=col_mask)


def _launch_config(n_rows: int, n_cols: int):
    block_v = min(triton.next_power_of_2(n_cols), 4096)
    num_warps = 4 if block_v <= 1024 else 8
    grid = (max(1, min(n_rows, MAX_PROGRAMS)),)
    return grid, block_v, num_warps


def token_logprobs_forward(logits, targets, inv_temperature: float, ignore_index: int, return_entropy: bool,
                          softcap=None):
    """logits [N, V] (stride(1) == 1), targets [N] int64 -> (logp [N], lse [N], entropy [N] or None), fp32.
    ``inv_temperature`` is logit_scale / T; ``softcap`` (pre_scale, post_scale) = (logit_scale / cap, cap / T)."""
    pre_scale, post_scale = softcap if softcap is not None else (1.0, 1.0)
    n_rows, n_cols = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = logp.new_empty(n_rows)
    entropy = logp.new_empty(n_rows) if return_entropy else logp
    grid, block_v, num_warps = _launch_config(n_rows, n_cols)
    _token_logprobs_fwd_kernel[grid](
        logits,
        logits.stride(0),
        targets,
        logp,
        lse,
        entropy,
        n_rows,
        n_cols,
        inv_temperature,
        pre_scale,
        post_scale,
        ignore_index,
        RETURN_ENTROPY=return_entropy,
        SOFTCAP=softcap is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, lse, (entropy if return_entropy else None)


def token_logprobs_backward(
    logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature: float, ignore_index: int, inplace=False,
    softcap=None,
):
    """Gradient w.r.t. logits [N, V], in the logits' dtype. grad_entropy may be None (entropy unused); the logit
    transform as in ``token_logprobs_forward``.

    With ``inplace`` the gradient overwrites ``logits`` (contiguous): each tile is read before it is written.
    """
    n_rows, n_cols = logits.shape
    if inplace and logits.is_contiguous():
        grad_logits = logits
    else:
        grad_logits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    has_grad_entropy = grad_entropy is not None
    pre_scale, post_scale = softcap if softcap is not None else (1.0, 1.0)
    grid, block_v, num_warps = _launch_config(n_rows, n_cols)
    _token_logprobs_bwd_kernel[grid](
        logits,
        logits.stride(0),
        targets,
        lse,
        entropy if has_grad_entropy else lse,
        grad_logp,
        grad_entropy if has_grad_entropy else grad_logp,
        grad_logits,
        grad_logits.stride(0),
        n_rows,
        n_cols,
        inv_temperature,
        pre_scale,
        post_scale,
        ignore_index,
        HAS_GRAD_ENTROPY=has_grad_entropy,
        SOFTCAP=softcap is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad_logits
