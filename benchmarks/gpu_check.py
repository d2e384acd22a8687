"""The GPU paths proven in one command: `make gpu-check PYTHON=python3` on a machine with a CUDA GPU.

    python benchmarks/gpu_check.py [--json bench_out/gpu_check.json] [--skip-build]

Steps, each a row of the table (and of the JSON), the exit status 1 if any failed:
1. build ``rlhf_engine._C`` in place with its CUDA sources (``RLHF_ENGINE_CUDA=1``);
2. the kernel tests with each backend forced (``RLHF_ENGINE_BACKEND=triton|torch``, ``TRITON_INTERPRET=0``, the
   tests' tensors made on ``cuda`` through ``RLHF_ENGINE_TEST_DEVICE``), the cache / paged-attention tests on
   ``cuda``, and the rollout exactness tests with their models on ``cuda`` (``RLHF_ENGINE_TEST_MODEL_DEVICE``);
3. the RL trainers' reward-rises test on cuda (ppo, grpo, rloo, reinforce++, remax; fp32), and a bf16 smoke on a
   tiny model on the GPU: SFT, reward model, GRPO, then DPO and PPO with LoRA adapters;
4. the floor cases of the log-prob, PPO-loss and paged-attention microbenchmarks against the naive PyTorch path
   (time and peak memory: a row each, with the floor beside the figure; a floor not met is reported, not counted
   as a failure: this run proves correctness), and the device-to-device copy bandwidth of this GPU (the limit of
   a pass over bf16 logits) beside what a token log-prob pass over 16384 x 151936 bf16 logits achieves.
It uses the interpreter it runs under, creates no venv and downloads nothing; the checkout runs uninstalled.
Each step's whole output goes to ``bench_out/gpu_check_logs/`` (a test step reports all its failures, not the
first). Without a GPU it says so, lists the steps and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # the benchmarks beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import relative_to_naive  # noqa: E402
from bench_logprobs import FLOOR_CASE  # noqa: E402

KERNEL_TESTS = ["tests/test_logprobs.py", "tests/test_linear_logprobs.py", "tests/test_logit_transforms.py",
                "tests/test_ppo_ops.py", "tests/test_dispatch.py",
                "tests/test_advantages.py::test_gae_matches_reference",
                "tests/test_advantages.py::test_gae_skips_interior_masked_span",
                "tests/test_advantages.py::test_gae_more_rows_than_programs"]
NATIVE_TESTS = ["tests/test_cache_ops.py", "tests/test_paged_attention.py"]
ROLLOUT_TESTS = ["tests/test_rollout.py", "tests/test_rollout_architectures.py"]
TRAINER_TESTS = ["tests/test_ppo_trainer.py::test_reward_rises"]  # ppo (critic + GAE), grpo, rloo, reinforce++, remax
BANDWIDTH_CASE = "token,16384,0,151936,bfloat16"  # 4.7 GiB of bf16 logits: a pass long enough to be read-bound
# (script, its options): each microbenchmark on its floor cases, its rows into bench_out/gpu_<script>.json
# (one subprocess a measurement: 22 in all, the PPO losses last)
BENCHMARKS = [("bench_logprobs.py", ["--floor", "--case", BANDWIDTH_CASE]),  # the issue-2 floor + the bandwidth
              ("bench_kv_cache.py", ["--floor"]),  # issue 4's floor: batch 32, context 1024
              ("bench_ppo_loss.py", ["--providers", "naive,ours"])]  # its default shapes are issue 15's floors
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
    steps.append(("the reward rises on cuda, 5 RL algorithms", [*pytest, *TRAINER_TESTS],
                  {"TRITON_INTERPRET": "0", "RLHF_ENGINE_TEST_MODEL_DEVICE": "cuda"}))
    steps.append(("bf16 smoke: SFT, RM, GRPO, DPO + LoRA, PPO + LoRA", [py, os.path.abspath(__file__), "--smoke"], {}))
    for script, options in BENCHMARKS:
        steps.append((" ".join([script, *options]), [py, f"benchmarks/{script}", *options, "--device", "cuda",
                                                     "--json", _bench_json(script)], {"TRITON_INTERPRET": "0"}))
    return steps


def _bench_json(script: str) -> str:
    return os.path.join("bench_out", f"gpu_{script[:-3]}.json")


def _ratios(rows: list[dict], key: tuple[str, ...], time_field: str) -> dict[tuple, dict]:
    """Per case (the ``key`` fields): ours' time and peak memory as multiples of the naive row of the same case."""
    times, memory = relative_to_naive(rows, key, time_field), relative_to_naive(rows, key, "peak_mib")
    return {tuple(r[k] for k in key): {"time": t, "memory": m, "row": r}
            for r, t, m in zip(rows, times, memory, strict=True) if r["provider"] == "ours" and not math.isnan(t)}


def _verdict(value: float, floor: float, unit: str = "x") -> str:
    return f"{value:.2f}{unit} (floor {floor}{unit}: {'met' if value <= floor else 'NOT met'})"


def benchmark_rows(bench_dir: str, copy_gbs: float | None) -> list[dict]:
    """The table's rows of measured figures, read from the benchmarks' JSON files: each floor case's time and
    memory against naive PyTorch, and the log-prob pass's bandwidth, as a share of ``copy_gbs`` (the measured
    device-to-device copy rate; None: not measured).
    A missing file or case gives no row (its benchmark's step has already failed)."""

    def load(script):
        path = os.path.join(bench_dir, os.path.basename(_bench_json(script)))
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return json.load(f)

    def row(text):
        return {"step": text, "ok": True, "seconds": 0.0}

    rows = []
    logprobs = load("bench_logprobs.py")
    for case, r in _ratios(logprobs, ("op", "N", "H", "V", "dtype"), "full_ms").items():
        if case == FLOOR_CASE:  # issue 2: time at most 1.3x naive, peak memory at most 1/8 of it
            rows.append(row(f"linear_logprobs {'x'.join(map(str, case[1:4]))} {case[4]} fwd+bwd: time "
                            f"{_verdict(r['time'], 1.3)}, peak memory {_verdict(r['memory'], 0.125)} of naive"))
    for r in logprobs:
        if r["op"] == "token" and r["provider"] == "ours" and r["forward_ms"] > 0:
            itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[r["dtype"]]
            achieved = r["N"] * r["V"] * itemsize / (r["forward_ms"] / 1e3) / 1e9
            share = "" if copy_gbs is None else f" ({achieved / copy_gbs:.2f} of the copy rate)"
            rows.append(row(f"token_logprobs {r['N']}x{r['V']} {r['dtype']} forward: {achieved:.0f} GB/s read{share}"))
    ppo = _ratios(load("bench_ppo_loss.py"), ("policy", "B", "T"), "full_ms")
    for shape in sorted({case[1:] for case in ppo}):  # issue 15: each policy loss at most 0.5x naive's time
        worst = max((case for case in ppo if case[1:] == shape), key=lambda case: ppo[case]["time"])
        extra = max(ppo[case]["row"]["extra_fp32"] for case in ppo if case[1:] == shape)
        rows.append(row(f"ppo_policy_loss {shape[0]}x{shape[1]} fwd+bwd, slowest kind ({worst[0]}): time "
                        f"{_verdict(ppo[worst]['time'], 0.5)} of naive; most extra memory "
                        f"{_verdict(extra, 2, ' fp32 [B, T] tensors')}"))
    decode = [r for r in load("bench_kv_cache.py") if r["bench"] == "decode"]  # (its prefix rows count tokens)
    for case, r in _ratios(decode, ("kv_heads", "head_dim", "batch", "context"), "ms").items():
        if case[2:] == (32, 1024):  # issue 4: at least as fast as gather + SDPA at batch 32, context 1024
            rows.append(row(f"paged decode attention batch 32, context 1024, kv_heads {case[0]}, head_dim {case[1]}:"
                            f" time {_verdict(r['time'], 1.0)} of gather + SDPA, {r['row']['gb_per_s']:.0f} GB/s"))
    return rows


def smoke(device: str = "cuda") -> int:
    """bf16 SFT -> reward model -> GRPO, then DPO and PPO (critic + GAE) with LoRA adapters, on a tiny model on
    ``device``, through the trainers' Python API."""
    import torch

    from rlhf_engine.data.jsonl import PreferenceRecord, SFTRecord
    from rlhf_engine.demo import task
    from rlhf_engine.demo.tokenizer import build_byte_tokenizer
    from rlhf_engine.models import load_causal_lm
    from rlhf_engine.models.heads import ScalarHeadModel
    from rlhf_engine.trainers import DPOConfig, RewardConfig, SFTConfig, train_dpo, train_reward_model, train_sft
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
        prompts = [task.format_prompt(p) for p in task.make_prompts(32, 0)]
        history = trainer.train(prompts, progress=False)
        assert all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
        # adapters (peft) on the GPU: DPO against the adapter-free base, PPO with a critic and GAE
        lora = {"precision": "bf16", "lora_r": 4, "lora_alpha": 8.0}
        rows = train_dpo(load_causal_lm(path, device=device), tokenizer, pairs,
                         DPOConfig(steps=5, batch_size=8, lr=1e-3, max_length=160, **lora), progress=False)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        config = PPOConfig(algorithm="ppo", iterations=2, prompts_per_iteration=8, max_new_tokens=16, lr=1e-4,
                           critic_lr=1e-4, minibatch_size=8, **lora)
        trainer = PPOTrainer(load_causal_lm(path, device=device), tokenizer, config,
                             reward_fn=lambda p, r: [sum(c < "m" for c in x) / max(1, len(x)) for x in r])
        history = trainer.train(prompts, progress=False)
        assert all(torch.isfinite(torch.tensor([h["policy_loss"], h["value_loss"]])).all() for h in history)
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
    for script, _ in BENCHMARKS:  # a failed benchmark step must not leave an earlier run's rows to be read below
        stale = os.path.join(ROOT, _bench_json(script))
        if os.path.isfile(stale):
            os.remove(stale)
    logs = os.path.join(os.path.dirname(os.path.abspath(args.json)), "gpu_check_logs")
    os.makedirs(logs, exist_ok=True)
    rows = []
    for i, (name, cmd, env) in enumerate(steps):
        left = BUDGET_S - (time.perf_counter() - start)
        if left <= 0:
            rows.append({"step": name, "ok": False, "seconds": 0.0, "output": "not run: the 8-minute budget is spent"})
            continue
        log = os.path.join(logs, f"{i:02d}-{''.join(c if c.isalnum() else '-' for c in name)}.log")
        rows.append(_run(name, cmd, env, timeout=int(left) + 1, log=log))  # the budget is the whole run's
        print(f"{'ok  ' if rows[-1]['ok'] else 'FAIL'} {name} ({rows[-1]['seconds']} s)", flush=True)
    try:
        copy_gbs = copy_bandwidth_gbs()
        rows.append({"step": f"D2D copy bandwidth {copy_gbs:.0f} GB/s", "ok": True, "seconds": 0.0})
    except Exception as err:  # a failed row: the table and the JSON still come out
        rows.append({"step": "D2D copy bandwidth", "ok": False, "seconds": 0.0,
                     "output": f"{type(err).__name__}: {err}"})
        copy_gbs = None
    try:
        rows += benchmark_rows(os.path.join(ROOT, "bench_out"), copy_gbs)
    except Exception as err:  # a benchmark whose rows changed shape: a failed row, the rest of the table kept
        rows.append({"step": "reading the benchmarks' rows", "ok": False, "seconds": 0.0,
                     "output": f"{type(err).__name__}: {err}"})
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
