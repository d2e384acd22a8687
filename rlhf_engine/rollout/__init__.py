"""Rollout: batched sampling on the paged KV cache (see ``engine.py``)."""

from rlhf_engine.rollout.engine import RolloutEngine, RolloutOutput, Sample
from rlhf_engine.rollout.sampling import SamplingParams

__all__ = ["RolloutEngine", "RolloutOutput", "Sample", "SamplingParams"]
