"""The GPU paths proven in one command: `make gpu-check PYTHON=python3` on a machine with a CUDA GPU.

    python benchmarks/gpu_check.py [--json bench_out/gpu_check.json] [--skip-build]

Steps, each a row of the table (and of the JSON), the exit status 1 if any failed:
1. build ``rlhf_engine._C`` in place with its CUDA sources (``RLHF_ENGINE_CUDA=1``);
2. the kernel tests with each backend forced (``RLHF_ENGINE_BACKEND=triton|torch``, ``TRITON_INTERPRET=0``, the
   tests' tensors made on ``cuda`` through ``RLHF_ENGINE_TEST_DEVICE``), the cache / paged-attention tests on
   ``cuda``, and the rollout exactness tests with their models on ``cuda`` (``RLHF_ENGINE_TEST_MODEL_DEVICE``);
3. a bf16 SFT, reward-model and GRPO smoke on a tiny model on the GPU;
4. the microbenchmarks' quick cases against the naive PyTorch path, and the device-to-device copy bandwidth
   of this GPU (the limit of a pass over bf16 logits) beside the token log-prob pass's achieved bandwidth.
It uses the interpreter it runs under, creates no venv and downloads nothing; the checkout runs uninstalled.
Each step's whole output goes to ``bench_out/gpu_check_logs/`` (a test step reports all its failures, not the
first). Without a GPU it says so, lists the steps and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = ["tests/test_logprobs.py", "tests/test_linear_logprobs.py", "tests/test_logit_transforms.py",
                "tests/test_ppo_ops.py", "tests/test_dispatch.py",
                "tests/test_advantages.py::test_gae_matches_reference",
                "tests/test_advantages.py::test_gae_skips_interior_masked_span",
                "tests/test_advantages.py::test_gae_more_rows_than_programs"]
NATIVE_TESTS = ["tests/test_cache_ops.py", "tests/test_paged_attention.py"]
ROLLOUT_TESTS = ["tests/test_rollout.py", "tests/test_rollout_architectures.py"]
BUDGET_S = 8 * 60


def _env(extra: dict | None) -> dict:
    """The environment of a step: this tree first on the import path, so that an uninstalled checkout (a bare
    GPU machine: no venv, `_C` built in place) runs, and an installed copy elsewhere does not stand in for it."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def _run(name: str, cmd: list[str], env: dict | None, timeout: int, log: str) -> dict:
    """One step, its output streamed into ``log`` (kept if the machine goes away mid-step); the table's row keeps
    the tail of a failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            ok = subprocess.run(cmd, cwd=ROOT, env=_env(env), stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
            f.write(f"\ntimed out after {timeout} s\n")
    row = {"step": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 1)}
    if not ok:
        with open(log, errors="replace") as f:
            row["output"] = f.read()[-4000:]
    return row


def plan() -> list[tuple[str, list[str], dict]]:
    py = sys.executable
    # every failure of a step in one run (a GPU run is rare), each listed in the summary at the end of the output
    pytest = [py, "-m", "pytest", "-q", "-rf", "--tb=short", "--maxfail=30"]
    steps = [("build _C with CUDA", [py, "setup.py", "build_ext", "--inplace"], {"RLHF_ENGINE_CUDA": "1"})]
    for backend in ("triton", "torch"):
        steps.append((f"kernel tests, {backend}", [*pytest, *KERNEL_TESTS],
                      {"RLHF_ENGINE_BACKEND": backend, "TRITON_INTERPRET": "0", "RLHF_ENGINE_TEST_DEVICE": "cuda"}))
    steps.append(("cache and paged attention on cuda", [*pytest, *NATIVE_TESTS],
                  {"TRITON_INTERPRET": "0"}))
    # the models on cuda, torch's default device left on the CPU: a tensor the engine makes without a device fails
    steps.append(("rollout exactness on cuda", [*pytest, *ROLLOUT_TESTS],
                  {"TRITON_INTERPRET": "0", "RLHF_ENGINE_TEST_MODEL_DEVICE": "cuda"}))
    steps.append(("bf16 SFT / RM / GRPO smoke", [py, os.path.abspath(__file__), "--smoke"], {}))
    for script in ("bench_logprobs.py", "bench_ppo_loss.py"):
        steps.append((f"{script} --quick", [py, f"benchmarks/{script}", "--quick", "--device", "cuda", "--json",
                                            f"bench_out/gpu_{script[:-3]}.json"], {"TRITON_INTERPRET": "0"}))
    return steps


def smoke(device: str = "cuda") -> int:
    """bf16 SFT -> reward model -> GRPO on a tiny model on ``device``, through the trainers' Python API."""
    import torch

    from rlhf_engine.data.jsonl import PreferenceRecord, SFTRecord
    from rlhf_engine.demo import task
    from rlhf_engine.demo.tokenizer import build_byte_tokenizer
    from rlhf_engine.models import load_causal_lm
    from rlhf_engine.models.heads import ScalarHeadModel
    from rlhf_engine.trainers import RewardConfig, SFTConfig, train_reward_model, train_sft
    from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer

    tokenizer = build_byte_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = task.build_tiny_model_dir(os.path.join(tmp, "m"), vocab_size=len(tokenizer), seed=0)
        policy = load_causal_lm(path, device=device)
        sft = [SFTRecord(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(256, 1)]
        rows = train_sft(policy, tokenizer, sft, SFTConfig(steps=20, lr=3e-3, max_length=128, precision="bf16"),
                         progress=False)
        assert rows[-1]["loss"] < rows[0]["loss"], "bf16 SFT did not lower the loss"
        pairs = [PreferenceRecord(task.format_prompt(e.prompt), e.response, e.response[::-1])
                 for e in task.make_sft_examples(128, 2)]
        rm = ScalarHeadModel(load_causal_lm(path, device=device)).to(device)
        train_reward_model(rm, tokenizer, pairs, RewardConfig(steps=10, lr=1e-3, max_length=160, precision="bf16"),
                           progress=False)
        config = PPOConfig(algorithm="grpo", iterations=3, prompts_per_iteration=8, n_samples=4, max_new_tokens=16,
                           lr=1e-5, minibatch_size=32, precision="bf16")
        trainer = PPOTrainer(policy, tokenizer, config, reward_model=rm.requires_grad_(False))
        history = trainer.train([task.format_prompt(p) for p in task.make_prompts(32, 0)], progress=False)
        assert all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
    print("smoke ok")
    return 0


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy rate (read + write bytes per second) of a 1 GiB buffer."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench_out/gpu_check.json")
    parser.add_argument("--skip-build", action="store_true", help="_C is already built with its CUDA sources")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    import torch

    steps = plan()[1:] if args.skip_build else plan()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch here; nothing run. On a GPU machine it would run:")
        for name, cmd, env in steps:
            print(f"  - {name}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}".rstrip())
        return 0
    start = time.perf_counter()
    bench = os.path.join(ROOT, "bench_out", "gpu_bench_logprobs.json")
    if os.path.isfile(bench):
        os.remove(bench)  # a failed benchmark step must not leave an earlier run's rows to be read below
    logs = os.path.join(os.path.dirname(os.path.abspath(args.json)), "gpu_check_logs")
    os.makedirs(logs, exist_ok=True)
    rows = []
    for i, (name, cmd, env) in enumerate(steps):
        left = BUDGET_S - (time.perf_counter() - start)
        if left <= 0:
            rows.append({"step": name, "ok": False, "seconds": 0.0, "output": "not run: the 8-minute budget is spent"})
            continue
        log = os.path.join(logs, f"{i:02d}-{''.join(c if c.isalnum() else '-' for c in name)}.log")
        rows.append(_run(name, cmd, env, timeout=int(max(30, left)), log=log))
        print(f"{'ok  ' if rows[-1]['ok'] else 'FAIL'} {name} ({rows[-1]['seconds']} s)", flush=True)
    bandwidth = copy_bandwidth_gbs()
    rows.append({"step": f"D2D copy bandwidth {bandwidth:.0f} GB/s", "ok": True, "seconds": 0.0})
    if os.path.isfile(bench):
        with open(bench) as f:
            for r in json.load(f):
                if r.get("op") == "token" and r.get("provider") == "ours" and r.get("forward_ms"):
                    itemsize = torch.empty(0, dtype=getattr(torch, r["dtype"])).element_size()  # "bfloat16"...
                    achieved = r["N"] * r["V"] * itemsize / (r["forward_ms"] / 1e3) / 1e9
                    rows.append({"step": f"token_logprobs {r['N']}x{r['V']} {r['dtype']} forward: {achieved:.0f} GB/s "
                                         f"read ({achieved / bandwidth:.2f} of the copy rate)", "ok": True,
                                 "seconds": 0.0})
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
               "seconds": round(time.perf_counter() - start, 1)}
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    for r in rows:  # the failures' tails first: the table, last, survives a truncated log
        if not r["ok"]:
            print(f"\n--- {r['step']} ---\n{r.get('output', '')}")
    print("\n| step | result | s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {'ok' if r['ok'] else 'FAIL'} | {r['seconds']} |")
    print(f"wrote {args.json} and every step's output to {logs} ({summary['device']}, {summary['seconds']} s)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
