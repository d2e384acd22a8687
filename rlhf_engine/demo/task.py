"""The embedded default task: short stories about a subject, from a tiny Llama-family model.

Prompts are templated over subjects; the SFT demonstrations are deliberately mediocre (templated, sometimes off
subject, sometimes repetitive) so that preference learning has something to improve later.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

SUBJECTS = [
    "cat", "dog", "robot", "dragon", "river", "city", "garden", "teacher", "ship", "moon",
    "forest", "baker", "bird", "train", "storm", "king", "mouse", "island", "clock", "star",
    "fox", "lamp", "horse", "painter", "bridge", "whale", "cloud", "farmer", "key", "owl",
]  # fmt: skip
PROMPT_TEMPLATES = [
    "Write a short story about a {s}.",
    "Tell me a tale about a {s}.",
    "Write a few lines about a {s}.",
]
OPENINGS = ["Once there was a {s}.", "A {s} lived near the sea.", "The {s} woke up early.", "There was a {s}."]
MIDDLES = [
    "It liked the warm sun.", "It was very very tired.", "It found a small red box.", "It walked and walked.",
    "It had a kind friend.", "It sang a song.", "Nothing much happened.", "It was a day.",
]  # fmt: skip
ENDINGS = ["The end.", "It was happy.", "Then it slept", "And so on and so on.", "Everyone smiled."]


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def format_prompt(prompt: str) -> str:
    """The chat format of the tiny model: the prompt, then the marker after which the response starts."""
    return f"User: {prompt}\nAssistant:"


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(PROMPT_TEMPLATES).format(s=rng.choice(SUBJECTS)) for _ in range(n)]


def subject_of(prompt: str) -> str:
    for subject in SUBJECTS:
        if f" {subject}." in prompt:
            return subject
    raise ValueError(f"no known subject in prompt {prompt!r}")


def demonstration(prompt: str, rng: random.Random) -> str:
    """A mediocre templated response: right subject most of the time, 2-4 sentences."""
    subject = subject_of(prompt) if rng.random() < 0.8 else rng.choice(SUBJECTS)
    sentences = [rng.choice(OPENINGS).format(s=subject)]
    sentences += rng.sample(MIDDLES, k=rng.randint(1, 2))
    sentences.append(rng.choice(ENDINGS))
    return " " + " ".join(sentences)


def make_sft_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(p, demonstration(p, rng)) for p in make_prompts(n, seed + 1)]


def build_tiny_model_dir(path: str, *, vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> str:
    """Creates a tiny Llama (RMSNorm, RoPE, GQA, SwiGLU) from a config and saves it with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path
