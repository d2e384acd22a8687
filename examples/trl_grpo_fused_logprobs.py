"""TRL's GRPOTrainer with rlhf-engine's fused log-probs: a subclass that swaps one method.

    pip install -e ".[bench]"                            # TRL is an optional extra
    python examples/trl_grpo_fused_logprobs.py           # tiny random Llama + byte tokenizer, a few steps on CPU
    python examples/trl_grpo_fused_logprobs.py --check   # first: ours vs TRL's own log-probs on one batch

Every per-token log-prob TRL's GRPO needs (policy with entropy, reference, old policy) goes through
``GRPOTrainer._get_per_token_logps_and_entropies``; the subclass computes it with
``rlhf_engine.integrations.hf.logprobs_from_model`` (body + ``linear_logprobs`` on the LM head, Triton on CUDA)
and leaves the rest of TRL alone. Multimodal inputs and MoE auxiliary losses go to TRL's own path. Positions
come from the attention mask, as in generation: with left-padded prompts of unequal lengths and an absolute-
position model (GPT-2) this differs from a forward without position_ids.

Written against TRL 1.16 (the hook is private API: other versions may name it differently, which is checked).
One process only: under DDP the forward must go through the wrapper, which this override bypasses.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from rlhf_engine.integrations.hf import logprobs_from_model

HOOK = "_get_per_token_logps_and_entropies"


def make_trainer_class():
    from trl import GRPOTrainer

    if not hasattr(GRPOTrainer, HOOK):
        import trl

        raise RuntimeError(f"TRL {trl.__version__}: GRPOTrainer has no {HOOK}; this example targets TRL 1.16")

    class FusedLogprobsGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose per-token log-probs come from rlhf-engine's fused ``logprobs_from_model``."""

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            if compute_aux_loss or any(v is not None for v in multimodal.values()):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
            model = self.accelerator.unwrap_model(model)
            # TRL scores the last `logits_to_keep` tokens (the completion); padding in it has attention_mask 0
            response_mask = torch.zeros_like(attention_mask)
            response_mask[:, -logits_to_keep:] = attention_mask[:, -logits_to_keep:]
            batch_size = batch_size or input_ids.shape[0]
            logps, entropies = [], []
            for start in range(0, input_ids.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                with self.accelerator.autocast():
                    out = logprobs_from_model(model, input_ids[rows], attention_mask[rows], response_mask[rows],
                                              temperature=self.temperature, return_entropy=compute_entropy)
                logp, entropy = out if compute_entropy else (out, None)
                # ours is [B, T-1] with position t = token t + 1, so the completion is the last logits_to_keep
                logps.append(logp[:, -logits_to_keep:])
                if compute_entropy:
                    entropies.append(entropy[:, -logits_to_keep:])
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    return FusedLogprobsGRPOTrainer


def reward_lowercase(prompts, completions, **kwargs) -> list[float]:
    """TRL's reward signature: the share of lowercase letters and spaces in each completion."""
    return [sum(c.islower() or c == " " for c in text) / max(1, len(text)) for text in completions]


def build_model_dir(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_engine.demo.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def check_against_trl(trainer, tokenizer) -> float:
    """Ours and TRL's own method on one left-padded batch of unequal prompts: the max |difference| of log-probs."""
    from trl import GRPOTrainer

    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ("Hi", "Tell me a story", "Once")]
    completion = tokenizer.encode(" about a cat.", add_special_tokens=False)
    width = max(map(len, prompts)) + len(completion)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) - len(completion):] = torch.tensor(p + completion)
        attention_mask[i, width - len(p) - len(completion):] = 1
    with torch.no_grad():
        ours, ours_entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, len(completion), compute_entropy=True)
        theirs, theirs_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, len(completion), compute_entropy=True)
    diff = max((ours - theirs).abs().max().item(), (ours_entropy - theirs_entropy).abs().max().item())
    print(f"check: max |ours - TRL| over log-probs and entropies = {diff:.2e}")
    return diff


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--check", action="store_true", help="compare with TRL's own log-probs on one batch first")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model_dir(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = ["Write a short story about a cat.", "Tell me a tale about a river.", "Describe the moon.",
                   "What does a baker do?"]
        config = GRPOConfig(
            output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=16, num_generations=4,
            max_completion_length=16, learning_rate=1e-2, beta=0.01, max_steps=args.steps, logging_steps=1,
            lr_scheduler_type="constant", report_to="none", save_strategy="no", bf16=False,
            gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
        )
        trainer = make_trainer_class()(model=model_dir, reward_funcs=reward_lowercase, args=config,
                                       train_dataset=Dataset.from_dict({"prompt": prompts}),
                                       processing_class=tokenizer)
        diff = check_against_trl(trainer, tokenizer) if args.check else None
        trainer.train()
        rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    print("reward per step: " + " ".join(f"{r:.3f}" for r in rewards))
    return {"check_max_abs_diff": diff, "rewards": rewards}


if __name__ == "__main__":
    main()
    sys.exit(0)
