"""Making experience, the steps between the rollout and the update that shape what the update sees: DAPO's soft
overlong punishment of the scores and the rollout-correction weights (importance sampling between the rollout
engine's sampling policy and the trained policy). Plain functions on tensors; the PPO trainer calls them.

Per-token tensors are [B, T] in target space with ``mask`` 1 on response tokens (see trainers/ppo.py).
"""

from __future__ import annotations

import torch

ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "seq-tis", "seq-mis")


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) of responses of ``lengths`` [B] tokens:

        0                                          length <= max_new_tokens - buffer
        -penalty (length - (max - buffer)) / buffer  inside the last ``buffer`` tokens
        -penalty                                   length > max_new_tokens (cannot happen: the rollout stops there)

    Returns [B] fp32, added to the scores; ``buffer`` 0 gives zeros.
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    start = max_new_tokens - buffer
    return -penalty * ((lengths - start) / buffer).clamp(min=0.0, max=1.0)


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, kind: str, *,
                       cap: float, low: float | None = None) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
    """Corrects for the rollout engine sampling from a slightly different policy than the one trained (other
    kernels, other precision): with the per-token ratio rho = exp(old_logp - rollout_logp) on response tokens,

        tis      token weights min(rho, cap)                       (truncated importance sampling)
        mis      tokens with rho outside [low, cap] leave the loss  (masked importance sampling)
        seq-tis  each row weighted by min(rho_seq, cap), rho_seq = exp(mean over the row's tokens of log rho)
        seq-mis  rows with rho_seq outside [low, cap] leave the loss
        none     nothing

    (low defaults to 1 / cap.) old_logp, rollout_logp, mask [B, T]. Returns ``(weights, loss_mask, stats)``:
    weights [B, T] fp32 for ``ppo_policy_loss(rollout_is_weights=)`` (None for none and the masking kinds),
    loss_mask [B, T] bool (the mask minus what was masked), and the logged numbers: rollout_ratio_mean / _max
    (of rho, or rho_seq for the seq kinds), and rollout_masked_tokens / rollout_masked_seqs (shares, masking
    kinds) or rollout_weight_mean (truncating kinds).
    """
    if kind not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction must be one of {list(ROLLOUT_CORRECTIONS)}, found {kind!r}")
    live = mask != 0
    if kind == "none":
        return None, live, {}
    low = 1.0 / cap if low is None else low
    log_ratio = torch.where(live, old_logp.float() - rollout_logp.float(), 0.0)
    tokens = live.sum().clamp(min=1)
    if kind.startswith("seq-"):
        count = live.sum(-1)
        seq_log = log_ratio.sum(-1) / count.clamp(min=1)
        ratio = torch.exp(seq_log.clamp(-20.0, 20.0))  # [B]
        rows = count > 0
        n_rows = rows.sum().clamp(min=1)
        stats = {"rollout_ratio_mean": float((ratio * rows).sum() / n_rows),
                 "rollout_ratio_max": float(ratio[rows].max()) if bool(rows.any()) else 0.0}
        if kind == "seq-tis":
            weight = ratio.clamp(max=cap)
            stats["rollout_weight_mean"] = float((weight * rows).sum() / n_rows)
            return torch.where(live, weight[:, None], 0.0), live, stats
        keep = (ratio >= low) & (ratio <= cap)
        loss_mask = live & keep[:, None]
    else:
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))  # [B, T]
        stats = {"rollout_ratio_mean": float((ratio * live).sum() / tokens),
                 "rollout_ratio_max": float(ratio[live].max()) if bool(live.any()) else 0.0}
        if kind == "tis":
            weight = torch.where(live, ratio.clamp(max=cap), 0.0)
            stats["rollout_weight_mean"] = float(weight.sum() / tokens)
            return weight, live, stats
        loss_mask = live & (ratio >= low) & (ratio <= cap)
    had_tokens = live.any(-1)
    stats["rollout_masked_tokens"] = float((live & ~loss_mask).sum() / tokens)
    stats["rollout_masked_seqs"] = float((had_tokens & ~loss_mask.any(-1)).sum() / had_tokens.sum().clamp(min=1))
    return None, loss_mask, stats
