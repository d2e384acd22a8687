"""Data: encoding, validation and collation of examples."""

from rlhf_engine.data.sft import SFTBatch, collate_sft, encode_sft

__all__ = ["SFTBatch", "collate_sft", "encode_sft"]
