"""The public functional API of rlhf-engine: every op a trainer, a benchmark or an outside trainer needs.

Each op validates its inputs, then one dispatcher (``rlhf_engine.ops._dispatch``) picks the Triton kernels
(CUDA tensors) or the PyTorch path (elsewhere); ``RLHF_ENGINE_BACKEND=torch|triton`` forces one.
"""

from rlhf_engine.ops._dispatch import requested_backend, select_backend, triton_available
from rlhf_engine.ops.logprobs import linear_logprobs, token_logprobs, token_logprobs_reference

__all__ = [
    "linear_logprobs",
    "requested_backend",
    "select_backend",
    "token_logprobs",
    "token_logprobs_reference",
    "triton_available",
]
