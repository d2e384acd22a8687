"""Benchmark: the peak memory and time of one SFT step (forward + backward through the fused log-prob head) with
and without ``gradient_checkpointing``, on a small Llama built from its config (nothing downloaded).

Each setting runs in its own subprocess; peak memory is beyond the model and its inputs (``_harness.measure``:
the allocator's peak on CUDA, the RSS growth on CPU).

    python benchmarks/bench_sft_memory.py [--quick] [--json PATH] [--repeat N] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, parse_args, run_worker, write_json  # noqa: E402

# (layers, hidden, intermediate, vocab, batch, sequence length)
DEFAULT_SHAPE = (8, 256, 704, 8192, 4, 1024)
QUICK_SHAPE = (4, 128, 352, 4096, 2, 512)


def worker(checkpointing: bool, shape: list, repeat: int, device: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_engine.data.sft import SFTBatch
    from rlhf_engine.models.heads import CausalLMLogprobs
    from rlhf_engine.models.loading import enable_gradient_checkpointing
    from rlhf_engine.trainers.sft import sft_loss

    layers, hidden, inter, vocab, batch, seq = shape
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=seq)
    model = LlamaForCausalLM(config).to(device).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    module = CausalLMLogprobs(model)
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100  # prompts
    data = SFTBatch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)

    def step():
        return sft_loss(module, data)[0] / (batch * seq)

    def warmup():
        small = SFTBatch(input_ids=input_ids[:1, :16], attention_mask=torch.ones_like(input_ids[:1, :16]),
                         labels=labels[:1, :16].clone().fill_(1))
        sft_loss(module, small)[0].backward()

    row = measure(step, list(model.parameters()), device, repeat, warmup=warmup)
    return {"gradient_checkpointing": checkpointing, "layers": layers, "hidden": hidden, "tokens": batch * seq, **row}


def main(argv=None):
    args = parse_args(__doc__, argv, worker)
    if args is None:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (2 if args.quick else 3)
    shape = list(QUICK_SHAPE if args.quick else DEFAULT_SHAPE)
    rows = [run_worker(__file__, [flag, shape, repeat, device]) for flag in (False, True)]
    print(f"device={device} threads={rows[0]['threads']} repeat={repeat} (median); layers, hidden, intermediate, "
          f"vocab, batch, seq = {shape}")
    print("| gradient_checkpointing | fwd+bwd ms | peak MiB | peak x | time x |")
    print("|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        print(f"| {r['gradient_checkpointing']} | {r['full_ms']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f} | {r['full_ms'] / base['full_ms']:.2f} |")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
