"""Benchmark: the clipped PPO loss with a k3 KL term, naive PyTorch vs rlhf-engine, forward+backward.

Providers:
  naive       the composition TRL writes: ratio, clamp, max, KL, masked mean and the clipfrac / approx_kl stats
              as separate PyTorch ops, autograd through all of them
  ours        rlhf_engine.ops.ppo_policy_loss, automatic backend (native C++ on CPU, Triton on CUDA)
  ours-torch  the same op forced onto its PyTorch twin (RLHF_ENGINE_BACKEND=torch)

Each (shape, provider) runs in its own subprocess. ``extra fp32`` is the peak memory beyond the inputs and the
gradient, in units of one [B, T] fp32 tensor.

    python benchmarks/bench_ppo_loss.py [--quick] [--json PATH] [--repeat N] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, parse_args, print_table, run_worker, write_json  # noqa: E402

DEFAULT_SHAPES = [(8, 512), (64, 2048), (256, 4096)]
QUICK_SHAPES = [(8, 512), (64, 2048)]
PROVIDERS = ("naive", "ours", "ours-torch")
CLIP, KL_COEF = 0.2, 0.05
VALUE_FIELDS = [
    ("forward_ms", "fwd ms"),
    ("backward_ms", "bwd ms"),
    ("full_ms", "fwd+bwd ms"),
    ("peak_mib", "peak MiB"),
    ("extra_fp32", "extra fp32"),
]


def naive_loss(logp, old_logp, advantages, mask, ref_logp):
    import torch

    ratio = torch.exp(logp - old_logp)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
    per_token = torch.max(pg_losses, pg_losses2)
    d = ref_logp - logp
    per_token = per_token + KL_COEF * (torch.exp(d) - d - 1)
    loss = (per_token * mask).sum() / mask.sum()
    with torch.no_grad():
        stats = {
            "clipfrac": ((pg_losses2 > pg_losses).float() * mask).sum() / mask.sum(),
            "approx_kl": ((old_logp - logp) * mask).sum() / mask.sum(),
            "ratio_mean": (ratio * mask).sum() / mask.sum(),
        }
    return loss, stats


def worker(b: int, t: int, provider: str, repeat: int, device: str) -> dict:
    import torch

    if provider == "ours-torch":
        os.environ["RLHF_ENGINE_BACKEND"] = "torch"
    from rlhf_engine.ops import ppo_policy_loss, select_backend

    torch.manual_seed(0)
    logp = (-torch.rand(b, t, device=device) * 3).requires_grad_()
    old_logp = logp.detach() + 0.2 * torch.randn(b, t, device=device)
    ref_logp = logp.detach() + 0.2 * torch.randn(b, t, device=device)
    advantages = torch.randn(b, t, device=device)
    lengths = torch.randint(1, t + 1, (b,), device=device)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).float()
    if provider == "naive":

        def forward():
            return naive_loss(logp, old_logp, advantages, mask, ref_logp)

        backend = "torch-autograd"
    else:

        def forward():
            return ppo_policy_loss(
                logp, old_logp, advantages, mask, clip_low=CLIP, ref_logp=ref_logp, kl_coef=KL_COEF
            )

        backend = select_backend("ppo_policy_loss", logp, available=("torch", "triton", "native"))[0]
    row = measure(forward, (logp,), device, repeat)
    tensor_mib = b * t * 4 / 2**20
    row["extra_fp32"] = round((row["peak_mib"] - tensor_mib) / tensor_mib, 2)  # the gradient is not extra
    return {"B": b, "T": t, "provider": provider, "backend": backend, **row}


def main(argv=None):
    args = parse_args(__doc__, argv, worker)
    if args is None:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (5 if args.quick else 20)
    rows = []
    for b, t in QUICK_SHAPES if args.quick else DEFAULT_SHAPES:
        for provider in PROVIDERS:
            rows.append(run_worker(__file__, [b, t, provider, repeat, device]))
            print(f"  done {b}x{t} {provider}", file=sys.stderr, flush=True)
    print(f"device={device} threads={rows[0]['threads']} repeat={repeat} (median); peak = extra over inputs")
    print_table(rows, ["B", "T"], VALUE_FIELDS)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
