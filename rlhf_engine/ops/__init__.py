"""The public functional API of rlhf-engine: every op a trainer, a benchmark or an outside trainer needs.

Each op validates its inputs, then one dispatcher (``rlhf_engine.ops._dispatch``) picks the Triton kernels
(CUDA tensors), the native C++ kernels (CPU tensors, for the ops that have them) or the PyTorch path;
``RLHF_ENGINE_BACKEND=torch|triton|native`` forces one. These modules import torch and nothing else of ours
at import time.
"""

from rlhf_engine.ops._dispatch import native_available, requested_backend, select_backend, triton_available
from rlhf_engine.ops.logprobs import linear_logprobs, token_logprobs, token_logprobs_reference
from rlhf_engine.ops.ppo import (
    AGG_MODES,
    KL_KINDS,
    aggregate_loss,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "aggregate_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "masked_mean",
    "masked_whiten",
    "native_available",
    "ppo_policy_loss",
    "requested_backend",
    "select_backend",
    "token_logprobs",
    "token_logprobs_reference",
    "triton_available",
    "value_loss",
]
