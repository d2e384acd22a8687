"""What the rollout tests compare against: Hugging Face greedy generate and a teacher-forced forward of the
training model. The test models live on RLHF_ENGINE_TEST_MODEL_DEVICE (`make gpu-check`: cuda; the CPU otherwise);
torch's default device stays the CPU, so an engine tensor made without a device fails there as for a user."""

import os

import torch

from rlhf_engine.ops import token_logprobs

DEVICE = os.environ.get("RLHF_ENGINE_TEST_MODEL_DEVICE", "cpu")


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    # an explicit attention mask: without it HF infers one from pad_token_id and masks prompt tokens equal to it
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def assert_logprobs_are_teacher_forced(model, prompt: list[int], sample, temperature: float) -> None:
    """``sample.logprobs`` (the rollout's) equal log softmax(logits / T)[token] of one forward over prompt + sample."""
    ids = torch.tensor([prompt + sample.token_ids], device=model.device)
    logits = model(ids).logits[0, len(prompt) - 1 : -1]
    expected = token_logprobs(logits, ids[0, len(prompt) :], temperature=temperature)
    torch.testing.assert_close(torch.tensor(sample.logprobs), expected.cpu(), atol=1e-4, rtol=0)


def random_prompts(vocab: int, seed: int = 0, lengths=(5, 17, 1, 33), low: int = 0) -> list[list[int]]:
    """Token ids in [low, vocab), ragged lengths; the same for a seed on every machine (a CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]
