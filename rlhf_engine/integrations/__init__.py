"""rlhf-engine inside other training loops: adapters from third-party model classes to ``rlhf_engine.ops``.

``hf``: Hugging Face causal LMs (``logprobs_from_model``, ``collate_rollouts``). Importing this package loads torch
and rlhf_engine's ops, not transformers: the adapters touch it only through the model object they are given.
"""

from rlhf_engine.integrations.hf import collate_rollouts, logprobs_from_model

__all__ = ["collate_rollouts", "logprobs_from_model"]
