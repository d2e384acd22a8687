"""A byte-level tokenizer built locally (nothing downloaded) and saved as a Hugging Face tokenizer.

Every UTF-8 byte is one token (ids 0..255, GPT-2's byte-to-unicode alphabet), then the special tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for the bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for token in (PAD, BOS, EOS):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=1024
    )
    tokenizer.padding_side = "right"
    return tokenizer
