"""Benchmark: the policy losses (ppo, gspo, cispo, sapo) with a k3 KL term, naive PyTorch vs rlhf-engine,
forward+backward.

Providers:
  naive       the composition verl and TRL write: ratio (or GSPO's sequence ratio, CISPO's detached clipped
              weight, SAPO's gate), clamp, max, KL, the masked aggregation and the clipfrac / approx_kl / ratio stats
              as separate PyTorch ops, autograd through all of them
  ours        rlhf_engine.ops.ppo_policy_loss(policy_loss=...), automatic backend (native C++ on CPU, Triton on
              CUDA)
  ours-torch  the same op forced onto its PyTorch twin (RLHF_ENGINE_BACKEND=torch)

Each (policy, shape, provider) runs in its own subprocess. ``extra fp32`` is the peak memory beyond the inputs and
the gradient, in units of one [B, T] fp32 tensor. Aggregation: each kind's default (token-mean for ppo and cispo,
seq-mean-token-mean for gspo and sapo), the same in both providers.

    python benchmarks/bench_ppo_loss.py [--quick] [--policies ppo,gspo] [--providers naive,ours] [--json PATH]
                                        [--repeat N] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, parse_args, print_table, run_worker, write_json  # noqa: E402

DEFAULT_SHAPES = [(64, 2048), (256, 4096)]  # the shapes of issue 15's floors
QUICK_SHAPES = [(8, 512), (64, 2048)]
POLICIES = ("ppo", "gspo", "cispo", "sapo")
PROVIDERS = ("naive", "ours", "ours-torch")
CLIP, KL_COEF, TAU_POS, TAU_NEG = 0.2, 0.05, 1.0, 1.05
VALUE_FIELDS = [
    ("forward_ms", "fwd ms"),
    ("backward_ms", "bwd ms"),
    ("full_ms", "fwd+bwd ms"),
    ("peak_mib", "peak MiB"),
    ("extra_fp32", "extra fp32"),
]


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _seq_mean_token_mean(x, mask):
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def naive_loss(policy, logp, old_logp, advantages, mask, ref_logp):
    import torch

    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    agg = _masked_mean
    if policy == "gspo":
        seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ratio = torch.exp(torch.clamp(logp - logp.detach() + seq.detach()[:, None], max=10.0))
        agg = _seq_mean_token_mean
    if policy == "sapo":
        tau = torch.where(advantages > 0, TAU_POS, TAU_NEG)
        per_token = -advantages * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        clipped = None
        agg = _seq_mean_token_mean
    elif policy == "cispo":
        weight = torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP).detach()
        per_token = -weight * advantages * logp
        clipped = (ratio < 1.0 - CLIP) | (ratio > 1.0 + CLIP)
    else:
        pg_losses = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
        per_token = torch.max(pg_losses, pg_losses2)
        clipped = pg_losses2 > pg_losses
    d = ref_logp - logp
    per_token = per_token + KL_COEF * (torch.exp(d) - d - 1)
    loss = agg(per_token, mask)
    with torch.no_grad():
        stats = {"approx_kl": _masked_mean(-log_ratio, mask), "ratio_mean": _masked_mean(ratio, mask)}
        if clipped is not None:
            stats["clipfrac"] = _masked_mean(clipped.float(), mask)
    return loss, stats


def _inputs(b: int, t: int, device: str):
    import torch

    logp = (-torch.rand(b, t, device=device) * 3).requires_grad_()
    old_logp = logp.detach() + 0.2 * torch.randn(b, t, device=device)
    ref_logp = logp.detach() + 0.2 * torch.randn(b, t, device=device)
    advantages = torch.randn(b, t, device=device)
    lengths = torch.randint(1, t + 1, (b,), device=device)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).float()
    return logp, old_logp, advantages, mask, ref_logp


def worker(policy: str, b: int, t: int, provider: str, repeat: int, device: str) -> dict:
    import torch

    if provider == "ours-torch":
        os.environ["RLHF_ENGINE_BACKEND"] = "torch"
    from rlhf_engine.ops import ppo_policy_loss, select_backend

    def call(logp, old_logp, advantages, mask, ref_logp):
        if provider == "naive":
            return naive_loss(policy, logp, old_logp, advantages, mask, ref_logp)
        return ppo_policy_loss(logp, old_logp, advantages, mask, policy_loss=policy, clip_low=CLIP, ref_logp=ref_logp,
                               kl_coef=KL_COEF, sapo_tau_pos=TAU_POS, sapo_tau_neg=TAU_NEG)

    def warmup():  # loads what the call loads on first use (the native extension, Triton's kernel) on 2 x 8
        small = _inputs(2, 8, device)
        call(*small)[0].backward()

    torch.manual_seed(0)
    inputs = _inputs(b, t, device)
    backend = "torch-autograd" if provider == "naive" else select_backend(
        "ppo_policy_loss", inputs[0], available=("torch", "triton", "native"))[0]
    row = measure(lambda: call(*inputs), (inputs[0],), device, repeat, warmup=warmup)
    tensor_mib = b * t * 4 / 2**20
    # the gradient is not extra; a CPU peak of 0 means tensors too small for the RSS to see (heap reuse)
    row["extra_fp32"] = round((row["peak_mib"] - tensor_mib) / tensor_mib, 2) if row["peak_mib"] else float("nan")
    return {"policy": policy, "B": b, "T": t, "provider": provider, "backend": backend, **row}


def _options(parser):
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policy losses to measure")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated providers to measure")


def _choices(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise SystemExit(f"{option}: unknown {unknown or 'none given'}; choose among {list(allowed)}")
    return chosen


def main(argv=None):
    args = parse_args(__doc__, argv, worker, add_options=_options)
    if args is None:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (5 if args.quick else 20)
    policies = _choices("--policies", args.policies, POLICIES)
    providers = _choices("--providers", args.providers, PROVIDERS)
    rows = []
    for policy in policies:
        for b, t in QUICK_SHAPES if args.quick else DEFAULT_SHAPES:
            for provider in providers:
                rows.append(run_worker(__file__, [policy, b, t, provider, repeat, device]))
                print(f"  done {policy} {b}x{t} {provider}", file=sys.stderr, flush=True)
    print(f"device={device} threads={rows[0]['threads']} repeat={repeat} (median); peak = extra over inputs")
    print_table(rows, ["policy", "B", "T"], VALUE_FIELDS)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
