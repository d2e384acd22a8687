"""Sampling parameters and the sampler: temperature, top-k, top-p; log-probs of the sampled distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf_engine.ops import token_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy. ``logprobs_after_truncation`` makes the returned log-probs
    those of the top-k/top-p renormalised distribution instead of the tempered full one."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs_after_truncation: bool = False

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"SamplingParams.{field} must be {expected}, found {getattr(self, field)!r}")

        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            bad("n", "an int >= 1")
        temperature = self.temperature
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            bad("temperature", "a finite number >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an int >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1]")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an int >= 1")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            bad("stop_token_ids", "a tuple of ints")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets to -inf every logit outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keeps the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """logits [N, V] -> (tokens [N] int64, logprobs [N] fp32 of the sampled tokens)."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(-1)
        return tokens, token_logprobs(logits, tokens)
    tempered = logits / params.temperature if params.temperature != 1.0 else logits
    truncated = _truncate(tempered, params.top_k, params.top_p)
    probs = torch.softmax(truncated, dim=-1)
    # NOTE: inverse-CDF sampling, one uniform per row against the running sum: an exact draw from Categorical(p)
    # for one cumsum; torch.multinomial (and a per-token exponential race) take ~30x longer on CPU at a 32k
    # vocabulary. u < total with right=True never lands on a token whose probability is 0.
    cdf = probs.cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    if truncated is tempered or params.logprobs_after_truncation:
        # the distribution sampled from is the one reported: reuse its probabilities
        return tokens, probs.gather(1, tokens[:, None]).squeeze(1).log()
    return tokens, token_logprobs(tempered, tokens)
