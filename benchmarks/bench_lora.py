"""Benchmark: LoRA against full fine-tuning of the same model, in memory (a GRPO iteration and a DPO step, the
reference included) and in rollout speed (the adapted modules as they are, against the adapters merged).

Model: a Llama built from its config (nothing downloaded), fp32, random weights. Each case runs in its own
subprocess. Memory is the peak over the process before the model was built (on CPU the growth of the peak RSS,
on CUDA the allocator's peak): the trained model, the reference (a frozen copy, or the same model with its
adapters disabled), gradients, optimizer state and activations, all of them. On CPU the workers run with
glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so that freed tensors go back to the system at once and the
peak RSS is the peak of live memory, not of the heap's fragmentation (which, measured without it, made the
LoRA run's peak 30% above the full run's although it keeps fewer tensors for the backward).

    python benchmarks/bench_lora.py [--quick] [--json PATH] [--repeat N] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import parse_args, peak_rss_bytes, rss_bytes, run_worker, write_json  # noqa: E402

# (layers, hidden, intermediate, vocab)
DEFAULT_DIMS = (8, 512, 1408, 8192)
QUICK_DIMS = (2, 128, 352, 2048)
RANK = 16


def _model(dims, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, vocab = dims
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(device)


class _Tokenizer:
    """What the trainers read from a tokenizer, over random ids (this benchmark measures no text)."""

    def __init__(self, vocab):
        self.vocab, self.pad_token_id, self.eos_token_id, self.bos_token_id = vocab, 0, None, 1

    def __len__(self):
        return self.vocab

    def encode(self, text, add_special_tokens=False):
        return [2 + (ord(c) * 7919 + i) % (self.vocab - 2) for i, c in enumerate(text)]

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def _peak(device, base):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return peak_rss_bytes() - base


def _grpo(dims, lora, device):
    from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer

    model = _model(dims, device)
    config = PPOConfig(algorithm="grpo", iterations=1, prompts_per_iteration=4, n_samples=4, max_new_tokens=64,
                       max_prompt_length=128, minibatch_size=16, lr=1e-5, lora_r=RANK if lora else 0,
                       lora_alpha=2.0 * RANK, device=device)
    trainer = PPOTrainer(model, _Tokenizer(dims[3]), config,
                         reward_fn=lambda p, r: [float(i % 3) for i in range(len(r))])
    prompts = ["a prompt of some length, " * 4 + str(i) for i in range(4)]
    trainer.step(prompts)


def _dpo(dims, lora, device):
    import torch

    from rlhf_engine.data.sft import SFTBatch
    from rlhf_engine.trainers.common import Trainer, move
    from rlhf_engine.trainers.dpo import DPOConfig, _dpo_sums

    model = _model(dims, device)
    config = DPOConfig(steps=1, batch_size=8, lr=1e-5, warmup_steps=0, max_length=256, lora_r=RANK if lora else 0,
                       lora_alpha=2.0 * RANK)
    g = torch.Generator().manual_seed(0)
    pairs, width = 8, 256
    ids = torch.randint(2, dims[3], (2 * pairs, width), generator=g)
    labels = ids.clone()
    labels[:, : width // 4] = -100
    batch = move(SFTBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels), device)
    from rlhf_engine.models.heads import CausalLMLogprobs
    from rlhf_engine.models.loading import prepare_lora
    from rlhf_engine.precision import frozen_copy

    reference = None if prepare_lora(model, config) else frozen_copy(model, "fp32")
    trainer = Trainer(config, "dpo", CausalLMLogprobs(model), progress=False)
    trainer.fit(lambda rng: [0], lambda rows: batch, lambda b: _dpo_sums(trainer.module, reference, b, config, model),
                lambda b: pairs)


def memory_worker(phase: str, lora: bool, dims: list, repeat: int, device: str) -> dict:
    import peft  # noqa: F401  (imported before the baseline: library pages are not the training's memory)
    import torch

    import rlhf_engine.trainers.dpo  # noqa: F401
    import rlhf_engine.trainers.ppo  # noqa: F401

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    t0 = time.perf_counter()
    (_grpo if phase == "grpo" else _dpo)(dims, lora, device)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in _model(dims, "meta").parameters())
    return {"kind": "memory", "phase": phase, "lora": lora, "rank": RANK if lora else 0, "params": params,
            "peak_mib": round(_peak(device, base) / 2**20, 1), "seconds": round(seconds, 2),
            "threads": torch.get_num_threads()}


def rollout_worker(merged: bool, dims: list, repeat: int, device: str) -> dict:
    import torch

    from rlhf_engine.models.lora import _tuner_layers, add_lora
    from rlhf_engine.rollout import RolloutEngine, SamplingParams

    model = add_lora(_model(dims, device), r=RANK, alpha=2.0 * RANK).eval()
    if merged:
        for layer in _tuner_layers(model):
            layer.merge()
    engine = RolloutEngine(model)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, dims[3], (8, 128), generator=g).tolist()
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=64, seed=0)
    engine.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=4))  # warm-up
    times, tokens = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    return {"kind": "rollout", "merged": merged, "tokens_per_s": round(tokens / statistics.median(times), 1),
            "threads": torch.get_num_threads()}


def worker(kind: str, *args):
    return memory_worker(*args) if kind == "memory" else rollout_worker(*args)


def main(argv=None):
    args = parse_args(__doc__, argv, worker)
    if args is None:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (1 if args.quick else 3)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # read by each worker's glibc at its start
    dims = list(QUICK_DIMS if args.quick else DEFAULT_DIMS)
    rows = []
    print(f"device={device} layers, hidden, intermediate, vocab = {dims}; LoRA rank {RANK}, all-linear")
    print("| phase | training | peak MiB | peak x | seconds |")
    print("|---|---|---|---|---|")
    for phase in ("grpo", "dpo"):
        full = run_worker(__file__, ["memory", phase, False, dims, repeat, device])
        lora = run_worker(__file__, ["memory", phase, True, dims, repeat, device])
        for r in (full, lora):
            print(f"| {phase} | {'LoRA r=' + str(RANK) if r['lora'] else 'full'} | {r['peak_mib']:.0f} | "
                  f"{r['peak_mib'] / max(full['peak_mib'], 1e-9):.2f} | {r['seconds']:.1f} |")
        rows += [full, lora]
    print("\n| rollout of the adapted model | tokens/s | x |")
    print("|---|---|---|")
    plain = run_worker(__file__, ["rollout", False, dims, repeat, device])
    merged = run_worker(__file__, ["rollout", True, dims, repeat, device])
    for r in (plain, merged):
        print(f"| {'merged' if r['merged'] else 'LoRA layers as they are'} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f} |")
    rows += [plain, merged]
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
