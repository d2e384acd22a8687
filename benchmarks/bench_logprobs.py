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
    python benchmarks/bench_logprobs.py --floor --rounds 5   # the floor case, naive/ours alternated 5 times
    python benchmarks/bench_logprobs.py --case token,16384,0,151936,bfloat16   # named cases only (repeatable)

With --rounds K each case runs K times per provider, alternating naive and ours (on a shared machine the load
then falls on both alike); the table shows the medians over rounds, and each round's time ratio is listed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, parse_args, print_table, run_worker, write_json  # noqa: E402

FLOOR_CASE = ("linear", 8192, 512, 32000, "float32")  # issue 2: time <= 1.3x naive, peak memory <= 1/8 of it
DEFAULT_CASES = [
    # (op, N, H, V, dtype)
    FLOOR_CASE,
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


def _add_options(parser) -> None:
    parser.add_argument("--floor", action="store_true", help="only the floor case of issue 2")
    parser.add_argument("--rounds", type=int, default=1, help="runs per case and provider, alternated (median)")
    parser.add_argument("--case", action="append", default=[], type=_parse_case, metavar="OP,N,H,V,DTYPE",
                        help="run this case (repeatable; with --floor, after the floor case), e.g. linear,8192,512,"
                             "32000,float32 or token,16384,0,151936,bfloat16 (H is 0 for token)")


def _parse_case(text: str) -> tuple:
    """``--case OP,N,H,V,DTYPE`` -> the case tuple; each bad field named with what it must be."""
    parts = text.split(",")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 5 comma-separated fields OP,N,H,V,DTYPE, found "
                                         f"{len(parts)}")
    op, dtype = parts[0], parts[4]
    if op not in ("linear", "token"):
        raise argparse.ArgumentTypeError(f"{text!r}: OP is {op!r}; use linear or token")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"{text!r}: DTYPE is {dtype!r}; use float32, bfloat16 or float16")
    sizes = {}
    for name, value, low in (("N", parts[1], 1), ("H", parts[2], 0), ("V", parts[3], 2)):
        try:
            sizes[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {name} is {value!r}; it must be an integer") from None
        if sizes[name] < low:
            raise argparse.ArgumentTypeError(f"{text!r}: {name} is {sizes[name]}; it must be at least {low}")
    if op == "token" and sizes["H"]:
        raise argparse.ArgumentTypeError(f"{text!r}: H is {sizes['H']}; use 0 for OP token (no hidden states)")
    if op == "linear" and not sizes["H"]:
        raise argparse.ArgumentTypeError(f"{text!r}: H is 0; OP linear needs the hidden size, at least 1")
    return (op, sizes["N"], sizes["H"], sizes["V"], dtype)


def _case(row: dict) -> tuple:
    return (row["op"], row["N"], row["H"], row["V"], row["dtype"])


def _median_rows(runs: list[dict]) -> list[dict]:
    """One row per (case, provider): the median of each value over its rounds."""
    groups: dict[tuple, list[dict]] = {}
    for row in runs:
        groups.setdefault((_case(row), row["provider"]), []).append(row)
    medians = []
    for group in groups.values():
        values = {field: statistics.median(r[field] for r in group) for field, _ in VALUE_FIELDS}
        medians.append({**group[0], **values, "rounds": len(group)})
    return medians


def main(argv=None):
    args = parse_args(__doc__, argv, worker, add_options=_add_options)
    if args is None:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (3 if args.quick else 5)
    cases = QUICK_CASES if args.quick else DEFAULT_CASES + (CUDA_CASES if device == "cuda" else [])
    if args.floor or args.case:
        cases = ([FLOOR_CASE] if args.floor else []) + args.case
    runs = []
    for case in cases:
        for round_ in range(args.rounds):
            for provider in PROVIDERS:
                runs.append(run_case(case, provider, repeat, device))
                print(f"  done {case} {provider} round {round_ + 1}", file=sys.stderr, flush=True)
    rows = _median_rows(runs)
    print(f"device={device} threads={rows[0]['threads']} repeat={repeat} (median) rounds={args.rounds} (median); "
          f"peak = extra over inputs")
    print_table(rows, ["op", "N", "H", "V", "dtype"], VALUE_FIELDS)
    if args.rounds > 1:
        for case in cases:
            full = {p: [r["full_ms"] for r in runs if r["provider"] == p and _case(r) == case] for p in PROVIDERS}
            ratios = " ".join(f"{o / n:.2f}" for n, o in zip(full["naive"], full["ours"], strict=True))
            print(f"{case}: time x per round (ours / naive of the same round): {ratios}")
    write_json(args.json, runs if args.rounds > 1 else rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
