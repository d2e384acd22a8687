"""A hand-written GRPO loop on a Hugging Face model, with rlhf-engine's parts and none of its trainers.

    python examples/hand_written_grpo.py                   # tiny random Llama + byte tokenizer, seconds on a CPU
    python examples/hand_written_grpo.py --model DIR       # a local HF model directory (with its tokenizer)

The parts: ``RolloutEngine`` samples n completions per prompt on the paged KV cache, reading the policy's own
weights (no copy, no weight sync); ``collate_rollouts`` pads them; ``logprobs_from_model`` gives the fused
per-token log-probs; ``group_advantages`` and ``ppo_policy_loss`` are the GRPO objective. The reward is the share
of lowercase letters and spaces in the completion, which a random byte-level policy can climb within a few steps.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from rlhf_engine.integrations.hf import collate_rollouts, logprobs_from_model
from rlhf_engine.ops import group_advantages, masked_mean, ppo_policy_loss
from rlhf_engine.rollout import RolloutEngine, SamplingParams

PROMPTS = ["Write a short story about a cat.", "Tell me a tale about a river.", "Describe the moon.",
           "What does a baker do?"]


def reward_fn(completions: list[str]) -> list[float]:
    return [sum(c.islower() or c == " " for c in text) / max(1, len(text)) for text in completions]


def load(model_dir: str | None):
    """A local HF model and tokenizer, or (no directory) a tiny random Llama and the byte tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return model, tokenizer
    from rlhf_engine.demo.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config), tokenizer


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF causal LM directory (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (GRPO's G)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--kl-coef", type=float, default=0.01, help="k3 KL to the frozen reference, as a loss term")
    args = parser.parse_args(argv)

    policy, tokenizer = load(args.model)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    engine = RolloutEngine(policy)  # reads the policy's parameters: every optimizer step is seen by the next rollout
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    history = []
    for step in range(args.steps):
        # 1. rollout: G samples per prompt, with the log-probs of the distribution they were drawn from
        params = SamplingParams(n=args.group_size, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                stop_token_ids=stop, seed=step)
        outputs = engine.generate(prompt_ids, params)
        batch = collate_rollouts(outputs, tokenizer.pad_token_id)  # rows: prompt-major, G adjacent samples
        completions = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for o in outputs for s in o.samples]

        # 2. score and turn the scores into per-token advantages (target space: [B, T-1])
        scores = torch.tensor(reward_fn(completions))
        mask = batch["response_mask"][:, 1:]
        advantages = group_advantages(scores, args.group_size)[:, None] * mask
        with torch.no_grad():
            ref_logp = logprobs_from_model(reference, batch["input_ids"], batch["attention_mask"],
                                           batch["response_mask"])

        # 3. one on-policy update: the sampler's log-probs are the old policy's (same weights, same temperature)
        logp, entropy = logprobs_from_model(policy, batch["input_ids"], batch["attention_mask"],
                                            batch["response_mask"], return_entropy=True)
        loss, stats = ppo_policy_loss(logp, batch["rollout_logprobs"], advantages, mask, ref_logp=ref_logp,
                                      kl_coef=args.kl_coef, kl_kind="k3")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()

        row = {"step": step, "reward": scores.mean().item(), "loss": loss.item(),
               "entropy": masked_mean(entropy.detach(), mask).item(), "kl": stats["kl_mean"].item(),
               "clipfrac": stats["clipfrac"].item(), "tokens_per_s": engine.stats["decode_tokens"]
               / max(engine.stats["seconds"], 1e-9)}
        history.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"sample: {completions[0]!r}")
    return history


if __name__ == "__main__":
    main()
    sys.exit(0)
