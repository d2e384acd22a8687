"""`make gpu-check` without a GPU: it says so, lists every step it would run, and exits 0; its smoke runs on the CPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: `make gpu-check` runs for real")
def test_without_a_gpu_it_lists_the_steps_and_exits_0(capsys):
    module = _load()
    assert module.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out
    for step in ("RLHF_ENGINE_CUDA=1", "RLHF_ENGINE_BACKEND=triton", "RLHF_ENGINE_BACKEND=torch", "--smoke",
                 "bench_logprobs.py", "--floor", "bench_ppo_loss.py", "bench_kv_cache.py", "test_paged_attention.py",
                 "RLHF_ENGINE_TEST_MODEL_DEVICE=cuda", "test_rollout_architectures.py"):
        assert step in out


def test_the_smoke_runs_on_the_cpu():
    """The GPU smoke (bf16 SFT -> reward model -> GRPO, DPO and PPO with LoRA, through the trainers' API) on the
    CPU: its calls stay in step with the trainers between the rare runs on a GPU."""
    assert _load().smoke("cpu") == 0


@pytest.mark.parametrize("where", ["nothing installed", "another checkout installed"])
def test_an_uninstalled_checkout_finds_its_kernels(where, tmp_path):
    """`make gpu-check` runs the tree with an interpreter where nothing is installed: ``rlhf_engine.kernels`` is
    then the top-level kernels/ folder (an install maps it there). ``-S``: no site-packages, so no install helps.
    A copy of the tree run with this venv (whose editable install maps the name to this checkout) takes its own."""
    import shutil
    import subprocess
    import sys

    root = SCRIPT.parents[1]
    flags = ["-S"]
    if where == "another checkout installed":
        shutil.copytree(root / "kernels", tmp_path / "kernels")
        (tmp_path / "rlhf_engine").mkdir()
        shutil.copy(root / "rlhf_engine" / "__init__.py", tmp_path / "rlhf_engine")
        (tmp_path / "csrc").mkdir()
        root, flags = tmp_path, []
    code = ("import importlib.util, rlhf_engine, rlhf_engine.kernels as k; assert rlhf_engine.kernels is k; "
            "print(k.__file__); print(importlib.util.find_spec('rlhf_engine.kernels.logprobs').origin)")
    out = subprocess.run([sys.executable, *flags, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": ""}).stdout.split()
    assert out == [str(root / "kernels" / "__init__.py"), str(root / "kernels" / "logprobs.py")]


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def on_a_gpu(monkeypatch, tmp_path):
    """gpu_check as on a GPU machine (torch sees one; the copy rate 4000 GB/s), its tree ``tmp_path``."""
    module = _load()
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    monkeypatch.setattr(module, "copy_bandwidth_gbs", lambda: 4000.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU of the test")
    return module


@pytest.fixture(scope="module")
def bench_rows():
    """Rows as the three benchmarks write them (one real row of each kind, measured here on tiny shapes, its
    schema kept), with the figures the table must show written over them."""
    logprobs, ppo, kv = (_benchmark(n) for n in ("bench_logprobs", "bench_ppo_loss", "bench_kv_cache"))
    token = logprobs.worker("token", 4, 0, 50, "float32", "ours", 1, "cpu")
    linear = logprobs.worker("linear", 4, 8, 50, "float32", "ours", 1, "cpu")
    loss = ppo.worker("ppo", 2, 8, "ours", 1, "cpu")
    decode = kv.decode_worker(1, 16, 1, 8, "ours", 1, "cpu")
    prefix = kv.prefix_rows(1)
    real = {"token": token, "linear": linear, "ppo": loss, "decode": decode}
    rows = {
        "bench_logprobs.py": [{**linear, "N": 8192, "H": 512, "V": 32000, "provider": p, "forward_ms": f,
                               "full_ms": t, "peak_mib": m}
                              for p, f, t, m in (("naive", 40.0, 100.0, 1000.0), ("ours", 30.0, 90.0, 100.0))]
                             + [{**token, "N": 16384, "V": 151936, "dtype": "bfloat16", "provider": p,
                                 "forward_ms": f, "full_ms": 3 * f, "peak_mib": 10.0}
                                for p, f in (("naive", 9.0), ("ours", 2.0))],
        "bench_ppo_loss.py": [{**loss, "policy": k, "B": 64, "T": 2048, "provider": p, "full_ms": t, "peak_mib": 2.0,
                               "extra_fp32": x}
                              for k, p, t, x in (("ppo", "naive", 10.0, 20.1), ("ppo", "ours", 3.0, 0.5),
                                                 ("sapo", "naive", 10.0, 20.3), ("sapo", "ours", 4.5, 0.98))],
        "bench_kv_cache.py": [{**decode, "kv_heads": 4, "head_dim": 128, "batch": b, "context": c, "provider": p,
                               "ms": t, "gb_per_s": g, "peak_mib": 1.0}
                              for b, c, p, t, g in ((32, 1024, "naive", 10.0, 100.0), (32, 1024, "ours", 12.0, 90.0),
                                                    (8, 256, "naive", 1.0, 20.0), (8, 256, "ours", 0.5, 40.0))]
                             + prefix,  # its prefix-sharing rows, which the table does not read
    }
    for written in rows.values():  # only fields the benchmarks write: a renamed one fails here, not on the GPU
        for row in written:
            kind = row.get("op") or ("ppo" if "policy" in row else row["bench"])
            if kind != "prefix":
                assert row.keys() == real[kind].keys(), (kind, set(row) ^ set(real[kind]))
    return rows


def test_on_a_gpu_it_runs_every_step_and_tables_the_floors(on_a_gpu, bench_rows, monkeypatch, tmp_path, capsys):
    """The GPU-only half of main() on the CPU, its steps replaced by small commands: every step runs (a failing
    one does not stop the rest), each has its log, the failure's output precedes the table, the exit status is
    1, a stale benchmark file is removed before the run, and the floor rows carry the benchmarks' figures."""
    import json
    import sys

    module, rows = on_a_gpu, bench_rows
    (tmp_path / "bench_out").mkdir()
    for script, data in rows.items():  # an earlier run's files: removed first, or this run would read them
        (tmp_path / module._bench_json(script)).write_text(json.dumps(data))
    write = ("import json, sys; rows = json.loads(sys.argv[1]); "
             "[open(path, 'w').write(json.dumps(data)) for path, data in rows.items()]")
    fresh = {module._bench_json(s): rows[s] for s in ("bench_logprobs.py", "bench_kv_cache.py")}  # ppo's fails
    steps = [("fails", [sys.executable, "-c", "import sys; print('boom at step one'); sys.exit(3)"], {}),
             ("benchmarks", [sys.executable, "-c", write, json.dumps(fresh)], {}),
             ("passes", [sys.executable, "-c", "print('fine')"], {"SOME_FLAG": "1"})]
    monkeypatch.setattr(module, "plan", lambda: steps)
    out_json = tmp_path / "out" / "gpu_check.json"
    assert module.main(["--json", str(out_json)]) == 1
    out = capsys.readouterr().out
    table = out[out.index("| step | result | s |"):]
    assert "boom at step one" in out[:out.index("| step | result | s |")]
    assert [line.split(" | ")[1] for line in table.splitlines()[2:5]] == ["FAIL", "ok", "ok"]
    expected = [
        "D2D copy bandwidth 4000 GB/s",
        "linear_logprobs 8192x512x32000 float32 fwd+bwd: time 0.90x (floor 1.3x: met), peak memory 0.10x "
        "(floor 0.125x: met) of naive",
        "token_logprobs 16384x151936 bfloat16 forward: 2489 GB/s read (0.62 of the copy rate)",
        "paged decode attention batch 32, context 1024, kv_heads 4, head_dim 128: time 1.20x (floor 1.0x: NOT met) "
        "of gather + SDPA, 90 GB/s",
    ]
    summary = json.loads(out_json.read_text())
    assert [r["step"] for r in summary["rows"]] == ["fails", "benchmarks", "passes", *expected]
    assert summary["device"] == "a GPU of the test"
    for text in expected:
        assert f"| {text} | ok |" in table
    assert "ppo_policy_loss" not in out  # the stale file was removed and no step wrote a new one
    logs = sorted((tmp_path / "out" / "gpu_check_logs").iterdir())
    assert [p.name for p in logs] == ["00-fails.log", "01-benchmarks.log", "02-passes.log"]
    assert "boom at step one" in logs[0].read_text() and "fine" in logs[2].read_text()


def test_the_ppo_floor_row_names_the_slowest_kind(bench_rows, tmp_path):
    module = _load()
    path = tmp_path / "gpu_bench_ppo_loss.json"
    path.write_text(__import__("json").dumps(bench_rows["bench_ppo_loss.py"]))
    assert [r["step"] for r in module.benchmark_rows(str(tmp_path), None)] == [
        "ppo_policy_loss 64x2048 fwd+bwd, slowest kind (sapo): time 0.45x (floor 0.5x: met) of naive; most extra "
        "memory 0.98 fp32 [B, T] tensors (floor 2 fp32 [B, T] tensors: met)"]


def test_a_spent_budget_fails_the_steps_it_did_not_run(on_a_gpu, monkeypatch, tmp_path, capsys):
    import sys

    module = on_a_gpu
    monkeypatch.setattr(module, "BUDGET_S", 0)
    monkeypatch.setattr(module, "plan", lambda: [("never", [sys.executable, "-c", "raise SystemExit(0)"], {})])
    assert module.main(["--json", str(tmp_path / "gpu_check.json")]) == 1
    assert "not run: the 8-minute budget is spent" in capsys.readouterr().out


def test_rows_it_cannot_read_fail_one_row_and_keep_the_table(on_a_gpu, monkeypatch, tmp_path, capsys):
    import json
    import sys

    module = on_a_gpu
    bad = json.dumps([{"bench": "decode", "provider": "naive", "ms": 1.0}])  # a benchmark whose rows changed shape
    write = f"import os; os.makedirs('bench_out', exist_ok=True); open({module._bench_json('bench_kv_cache.py')!r}, " \
            f"'w').write({bad!r})"
    monkeypatch.setattr(module, "plan", lambda: [("writes", [sys.executable, "-c", write], {})])
    assert module.main(["--json", str(tmp_path / "gpu_check.json")]) == 1
    out = capsys.readouterr().out
    assert "| reading the benchmarks' rows | FAIL |" in out and "KeyError: 'kv_heads'" in out
    assert "| writes | ok |" in out and "| D2D copy bandwidth 4000 GB/s | ok |" in out
