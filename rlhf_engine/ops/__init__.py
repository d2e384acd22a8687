"""The public functional API of rlhf-engine: every op a trainer, a benchmark or an outside trainer needs.

Stable (semantics, math and shapes in each docstring; per-token tensors are [..., T] with a same-shape mask):

    token_logprobs(logits, targets)                       log p(target) [...] (+ entropy) from logits [..., V]
    linear_logprobs(hidden, weight, targets, bias=)       the same from hidden [..., H] and the LM head [V, H]
    kl_penalty(logp, ref_logp, kind)                      per-token KL estimate (k1 | abs | k2 | k3)
    ppo_policy_loss(logp, old_logp, advantages, mask)     ppo | gspo | cispo | sapo surrogate (+ KL) -> (loss, stats)
    value_loss(values, old_values, returns, mask)         clipped critic loss -> (loss, stats)
    gae(rewards, values, mask)                            (advantages, returns)
    group_advantages(scores, group_size | index=, kind=)  GRPO / RLOO / REINFORCE++ outcome advantages [N]
    reinforce_pp_returns(token_rewards, mask, gamma)      REINFORCE++ advantages: whitened discounted returns
    masked_mean, masked_whiten, aggregate_loss            masked reductions
    AGG_MODES, KL_KINDS, POLICY_LOSSES                    the accepted ``agg``, ``kind`` and ``policy_loss`` strings

For a Hugging Face model, ``rlhf_engine.integrations.hf.logprobs_from_model`` runs its body and
``linear_logprobs`` on its LM head.

Each op validates its inputs, then one dispatcher (``rlhf_engine.ops._dispatch``) picks the Triton kernels
(CUDA tensors), the native C++ kernels (CPU tensors, for the ops that have them) or the PyTorch path;
``RLHF_ENGINE_BACKEND=torch|triton|native`` forces one (``select_backend`` and friends report the choice). A
kernel that fails raises ``KernelError`` (op, backend, shapes, how to force the PyTorch path); nothing falls back.
These modules import torch and nothing else of ours at import time.
"""

from rlhf_engine.ops._dispatch import (
    KernelError,
    native_available,
    requested_backend,
    select_backend,
    triton_available,
)
from rlhf_engine.ops.advantages import gae, group_advantages, reinforce_pp_returns
from rlhf_engine.ops.logprobs import linear_logprobs, token_logprobs, token_logprobs_reference
from rlhf_engine.ops.ppo import (
    AGG_MODES,
    KL_KINDS,
    POLICY_LOSSES,
    aggregate_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)

__all__ = [
    # the stable functional API
    "token_logprobs",
    "linear_logprobs",
    "kl_penalty",
    "ppo_policy_loss",
    "value_loss",
    "gae",
    "group_advantages",
    "reinforce_pp_returns",
    "masked_mean",
    "masked_whiten",
    "aggregate_loss",
    "AGG_MODES",
    "KL_KINDS",
    "POLICY_LOSSES",
    # the eager reference of token_logprobs (baseline of the benchmarks, oracle of the tests)
    "token_logprobs_reference",
    # backend introspection
    "native_available",
    "requested_backend",
    "select_backend",
    "KernelError",
    "triton_available",
]
