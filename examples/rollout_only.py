"""rlhf-engine's RolloutEngine on a Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2), without its trainers.

    python examples/rollout_only.py --model DIR -n 4 --prompt "Once upon a time"   # a local HF model directory
    python examples/rollout_only.py --arch gpt2                                    # tiny random model, byte tokens

Each prompt is prefilled once and forked into its n samples on the paged KV cache; all live samples decode
together. The engine reads the model's own parameters, so in a training loop it always samples from the current
weights (after an optimizer step its prefix cache is dropped on the next ``generate``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from rlhf_engine.rollout import RolloutEngine, SamplingParams


def tiny_model(arch: str, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                          bos_token_id=None, eos_token_id=None))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256))


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF causal LM directory with its tokenizer")
    parser.add_argument("--arch", choices=("llama", "gpt2"), default="llama", help="tiny random model without --model")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("-n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    else:
        from rlhf_engine.demo.tokenizer import build_byte_tokenizer

        tokenizer = build_byte_tokenizer()
        model = tiny_model(args.arch, len(tokenizer))
    prompts = args.prompt or ["Once upon a time", "The quick brown fox"]

    engine = RolloutEngine(model)  # raises a ValueError naming the supported families for any other model
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, stop_token_ids=stop, seed=args.seed)
    outputs = engine.generate([tokenizer.encode(p, add_special_tokens=False) for p in prompts], params)
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f"prompt: {prompt!r} ({len(out.prompt_token_ids)} tokens)")
        for k, sample in enumerate(out.samples):
            text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            print(f"  [{k}] {len(sample.token_ids):3d} tokens, {sample.finish_reason:6s}, "
                  f"sum logp {sum(sample.logprobs):8.2f}: {text!r}")
    stats = engine.stats
    print(f"{stats['decode_tokens']} decode tokens in {stats['seconds']:.2f} s "
          f"({stats['decode_tokens'] / max(stats['seconds'], 1e-9):.0f} tokens/s); prefill {stats['prefill_tokens']} "
          f"tokens, {stats['reused_prefix_tokens']} reused from the prefix cache; {stats['forward_calls']} forwards")
    return outputs


if __name__ == "__main__":
    main()
    sys.exit(0)
