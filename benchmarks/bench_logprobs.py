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

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_CASES = [
    # (op, N, H, V, dtype)
    ("linear", 8192, 512, 32000, "float32"),  # the floor case of issue 2
    ("linear", 4096, 1024, 50257, "float32"),
    ("linear", 4096, 512, 32000, "bfloat16"),
    ("token", 4096, 0, 32000, "float32"),
    ("token", 1024, 0, 151936, "bfloat16"),
]
QUICK_CASES = [
    ("linear", 1024, 256, 8000, "float32"),
    ("token", 1024, 0, 8000, "float32"),
]
PROVIDERS = ("naive", "ours")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def full():
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out.backward(grad_out)
        sync()

    # peak memory of one forward+backward, over what the inputs already hold
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        full()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        full()
        peak = _peak_rss_bytes() - base
    fwd_times, full_times = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = forward()
        sync()
        fwd_times.append(time.perf_counter() - t0)
        del out
        t0 = time.perf_counter()
        full()
        full_times.append(time.perf_counter() - t0)
    fwd_ms = statistics.median(fwd_times) * 1e3
    full_ms = statistics.median(full_times) * 1e3
    return {
        "op": op,
        "N": n,
        "H": h,
        "V": v,
        "dtype": dtype_name,
        "provider": provider,
        "device": device,
        "threads": torch.get_num_threads(),
        "forward_ms": round(fwd_ms, 2),
        "backward_ms": round(full_ms - fwd_ms, 2),
        "full_ms": round(full_ms, 2),
        "peak_mib": round(max(peak, 0) / 2**20, 1),
    }


def run_case(case, provider, repeat, device):
    op, n, h, v, dtype = case
    cmd = [sys.executable, __file__, "--worker", json.dumps([op, n, h, v, dtype, provider, repeat, device])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {case} {provider} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows):
    header = f"{'op':<7}{'N':>6}{'H':>6}{'V':>8} {'dtype':<9}{'provider':<9}{'fwd ms':>10}{'bwd ms':>10}"
    header += f"{'full ms':>10}{'peak MiB':>10}{'time x':>8}{'mem x':>8}"
    print(header)
    print("-" * len(header))
    naive = {(r["op"], r["N"], r["H"], r["V"], r["dtype"]): r for r in rows if r["provider"] == "naive"}
    for r in rows:
        base = naive.get((r["op"], r["N"], r["H"], r["V"], r["dtype"]))
        t_ratio = r["full_ms"] / base["full_ms"] if base else float("nan")
        m_ratio = r["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 else float("nan")
        print(
            f"{r['op']:<7}{r['N']:>6}{r['H']:>6}{r['V']:>8} {r['dtype']:<9}{r['provider']:<9}"
            f"{r['forward_ms']:>10.1f}{r['backward_ms']:>10.1f}{r['full_ms']:>10.1f}{r['peak_mib']:>10.1f}"
            f"{t_ratio:>8.2f}{m_ratio:>8.3f}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions per case (median)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (3 if args.quick else 5)
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    rows = []
    for case in cases:
        for provider in PROVIDERS:
            rows.append(run_case(case, provider, repeat, device))
            print(f"  done {case} {provider}", file=sys.stderr, flush=True)
    print(f"device={device} threads={rows[0]['threads']} repeat={repeat} (median); peak = extra over inputs")
    print_table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
