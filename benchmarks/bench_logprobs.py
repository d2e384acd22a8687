"""Benchmark: token log-probs, naive PyTorch vs rlhf-engine.

Providers:
  naive   token:  log_softmax(logits.float() / T).gather(target)         (materialises [N, V] fp32 twice)
          linear: lm_head (F.linear) then the same                        (plus the [N, V] logits)
  ours    token:  rlhf_engine.ops.token_logprobs
          linear: rlhf_engine.ops.linear_logprobs                         (chunked: [N, V] never exists)

Each (case, provider) runs in its own subprocess so that peak memory is its own: on CUDA the allocator's peak,
on CPU the growth of the process's peak RSS over the RSS once inputs exist. Times are medians of --repeat
forward+backward passes (forward alone is timed too; backward = full - forward).

    python benchmarks/bench_logprobs.py                 # the default cases (includes the issue's floor case)
    python benchmarks/bench_logprobs.py --quick         # small shapes, a few seconds
    python benchmarks/bench_logprobs.py --json out.json # also write the rows
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, parse_args, print_table, run_worker, write_json  # noqa: E402

DEFAULT_CASES = [
    # (op, N, H, V, dtype)
    ("linear", 8192, 512, 32000, "float32"),  # the floor case of issue 2
    ("linear", 2048, 1024, 50257, "float32"),
    ("token", 4096, 0, 32000, "float32"),
    ("token", 1024, 0, 151936, "bfloat16"),
]
# NOTE: bf16 LM-head cases only on CUDA: CPUs without bf16 matmul units take minutes per case.
CUDA_CASES = [
    ("linear", 8192, 4096, 128256, "bfloat16"),
    ("linear", 16384, 2048, 151936, "bfloat16"),
    ("token", 16384, 0, 151936, "bfloat16"),
]
QUICK_CASES = [
    ("linear", 1024, 256, 8000, "float32"),
    ("token", 1024, 0, 8000, "float32"),
]
PROVIDERS = ("naive", "ours")
VALUE_FIELDS = [
    ("forward_ms", "fwd ms"),
    ("backward_ms", "bwd ms"),
    ("full_ms", "fwd+bwd ms"),
    ("peak_mib", "peak MiB"),
]


def worker(op: str, n: int, h: int, v: int, dtype_name: str, provider: str, repeat: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from rlhf_engine.ops import linear_logprobs, token_logprobs

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    targets = torch.randint(0, v, (n,), device=device)
    grad_out = torch.randn(n, device=device)
    if op == "linear":
        hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
        leaves = (hidden, weight)
        if provider == "naive":

            def forward():
                logits = F.linear(hidden, weight)
                return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        else:

            def forward():
                return linear_logprobs(hidden, weight, targets)
    else:
        logits = (torch.randn(n, v, device=device) * 2).to(dtype).requires_grad_()
        leaves = (logits,)
        if provider == "naive":

            def forward():
                return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        else:

            def forward():
                return token_logprobs(logits, targets)

    row = measure(forward, leaves, device, repeat, grad_out=grad_out)
    return {"op": op, "N": n, "H": h, "V": v, "dtype": dtype_name, "provider": provider, **row}


def run_case(case, provider, repeat, device):
    op, n, h, v, dtype = case
    return run_worker(__file__, [op, n, h, v, dtype, provider, repeat, device])


def main(argv=None):
    args = parse_args(__doc__, argv, worker)
    if args is None:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (3 if args.quick else 5)
    cases = QUICK_CASES if args.quick else DEFAULT_CASES + (CUDA_CASES if device == "cuda" else [])
    rows = []
    for case in cases:
        for provider in PROVIDERS:
            rows.append(run_case(case, provider, repeat, device))
            print(f"  done {case} {provider}", file=sys.stderr, flush=True)
    print(f"device={device} threads={rows[0]['threads']} repeat={repeat} (median); peak = extra over inputs")
    print_table(rows, ["op", "N", "H", "V", "dtype"], VALUE_FIELDS)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
