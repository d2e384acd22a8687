"""Mixed precision: one `precision` key, fp32 master weights under bf16/fp16 compute, dynamic loss scaling for fp16,
a compute-dtype rollout copy refreshed only when the weights moved, and the old keys named as replaced."""

import copy

import pytest
import torch

from rlhf_engine.config import ConfigError, load_config
from rlhf_engine.data.jsonl import SFTRecord
from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm
from rlhf_engine.precision import LossScaler, RolloutWeights
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_engine.trainers.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_byte_tokenizer()
    return task.build_tiny_model_dir(str(tmp_path_factory.mktemp("p") / "m"), vocab_size=len(tokenizer), seed=3,
                                     hidden_size=32), tokenizer


def test_precision_key_and_the_old_keys(tmp_path):
    assert load_config(SFTConfig, None, ["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        SFTConfig(precision="bfloat16")
    path = tmp_path / "old.yaml"
    path.write_text("dtype: bfloat16\n")
    with pytest.raises(ConfigError, match=r"'dtype' of SFTConfig was replaced: use precision: fp32 \| bf16 \| fp16"):
        load_config(SFTConfig, str(path))
    with pytest.raises(ConfigError, match="'bf16' of PPOConfig was replaced: use precision: bf16"):
        load_config(PPOConfig, None, ["--bf16", "true"])


def test_loss_scaler_backs_off_on_overflow_and_grows_after_clean_steps():
    scaler = LossScaler("fp16", init_scale=1024.0, growth_interval=3)
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([1024.0, -2048.0])
    scaler.unscale_([param])
    assert param.grad.tolist() == [1.0, -2.0]
    assert scaler.update(False) is True and scaler.scale == 512.0  # overflow: skip, halve
    assert [scaler.update(True) for _ in range(3)] == [False] * 3 and scaler.scale == 1024.0
    restored = LossScaler("fp16")
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale == 1024.0
    off = LossScaler("bf16")
    assert off.scale == 1.0 and off.update(False) is False  # bf16 needs no scaling: non-finite is a real failure


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_sft_keeps_fp32_masters_and_every_update(model_dir, precision):
    """At lr 2e-5 a bf16 weight (8 mantissa bits) would round most AdamW updates away; with fp32 masters every
    weight that has a gradient moves, and the weights, gradients and optimizer state stay fp32."""
    path, tokenizer = model_dir
    model = load_causal_lm(path)
    before = copy.deepcopy(model.state_dict())
    records = [SFTRecord(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(16, 5)]
    rows = train_sft(model, tokenizer, records, SFTConfig(steps=3, batch_size=8, lr=2e-5, warmup_steps=0,
                                                          max_length=128, precision=precision), progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert ("loss_scale" in rows[-1]) == (precision == "fp16")
    # the attention/MLP weights all receive gradient: AdamW moves each by about lr per step
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        changed = (model.state_dict()[name] != before[name]).float().mean().item()
        assert changed > 0.99, (name, changed)


def test_rollout_weights_shadow_refreshes_only_when_the_masters_moved(model_dir):
    path, _ = model_dir
    model = load_causal_lm(path)
    weights = RolloutWeights(model, "bf16")
    assert weights.is_shadow and all(p.dtype == torch.bfloat16 for p in weights.model.parameters())
    assert weights.shadow_bytes() == 2 * sum(p.numel() for p in model.parameters())
    assert weights.refresh() is False
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert weights.refresh() is True and weights.refresh() is False
    assert torch.equal(weights.model.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert RolloutWeights(model, "fp32").model is model  # fp32: the rollout reads the masters in place


def test_grpo_in_bf16_trains_fp32_masters_against_a_bf16_reference(model_dir):
    path, tokenizer = model_dir
    model = load_causal_lm(path)
    config = PPOConfig(algorithm="grpo", iterations=2, prompts_per_iteration=4, n_samples=4, max_new_tokens=8,
                       lr=1e-3, minibatch_size=16, kl_coef=0.01, precision="bf16", seed=1)
    trainer = PPOTrainer(model, tokenizer, config,
                         reward_fn=lambda p, r: [sum(c < "m" for c in x) / max(1, len(x)) for x in r])
    history = trainer.train([task.format_prompt(p) for p in task.make_prompts(8, seed=0)], progress=False)
    assert next(trainer.reference.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert trainer.engine.model is trainer.rollout_weights.model  # the rollout reads the bf16 shadow
    assert all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
    # the shadow follows the masters: after the last update it equals them, rounded to bf16
    trainer.rollout_weights.refresh()
    assert torch.equal(trainer.rollout_weights.model.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


_TF32_CHECK = """
import torch
from rlhf_engine.precision import tf32
{caller}
def look():  # every switch, legacy and per-backend; a legacy one raises once a per-backend one says tf32
    out = []
    for read in (torch.get_float32_matmul_precision, lambda: torch.backends.cuda.matmul.allow_tf32,
                 lambda: torch.backends.cudnn.allow_tf32, lambda: torch.backends.cuda.matmul.fp32_precision,
                 lambda: torch.backends.cudnn.conv.fp32_precision):
        try:
            out.append(read())
        except (RuntimeError, AttributeError) as err:
            out.append(type(err).__name__)
    return out
before = look()
for enabled in (True, False):
    try:
        with tf32(torch.device("cuda"), enabled):
            matmul = torch.backends.cuda.matmul
            if hasattr(matmul, "fp32_precision"):
                assert matmul.fp32_precision == ("tf32" if enabled else "ieee"), look()
            else:
                assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest"), look()
            raise KeyError("a failing run")
    except KeyError:
        pass
    assert look() == before, (enabled, before, look())
    with tf32(torch.device("cpu"), enabled):
        assert look() == before
print("restored", before)
"""


@pytest.mark.parametrize("caller", ["", "torch.set_float32_matmul_precision('medium')",
                                    "torch.backends.fp32_precision = 'tf32'"],
                         ids=["torch's defaults", "legacy API", "per-backend API (transformers' enable_tf32)"])
def test_tf32_holds_while_the_block_runs_and_the_callers_setting_returns(caller):
    """torch's TF32 switches are process-wide (settable without a GPU; each case in a fresh interpreter): a run
    sets them on CUDA and restores what it found, an exception included, whichever API the caller used (on torch
    >= 2.9 reading the legacy ones raises once the per-backend ones say tf32); the CPU leaves them alone."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TF32_CHECK.format(caller=caller)], capture_output=True, text=True)
    assert out.returncode == 0 and "restored" in out.stdout, out.stderr[-3000:]


def test_the_trainers_run_under_their_tf32_setting(model_dir, monkeypatch):
    """Trainer.fit (SFT, RM, DPO) and PPOTrainer's train, step, rollout and update run inside
    ``tf32(device, config.tf32)``: the Python API honours the key as the CLI does."""
    import contextlib

    from rlhf_engine.trainers import common

    scopes, depth = [], [0]  # every scope entered; how many are open now (they nest: train -> step -> update)

    @contextlib.contextmanager
    def spy(device, enabled):
        scopes.append((device.type, enabled))
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(common, "tf32", spy)
    path, tokenizer = model_dir
    records = [SFTRecord(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(4, 5)]
    steps = []
    train_sft(load_causal_lm(path), tokenizer, records, SFTConfig(steps=1, batch_size=2, max_length=64, tf32=False),
              progress=False, on_step=lambda row: steps.append(depth[0]))
    trainer = PPOTrainer(load_causal_lm(path), tokenizer,
                         PPOConfig(algorithm="grpo", iterations=1, prompts_per_iteration=2, n_samples=2,
                                   max_new_tokens=4, minibatch_size=4),
                         reward_fn=lambda p, r: [float(len(x)) for x in r])
    prompts = [task.format_prompt(p) for p in task.make_prompts(2, seed=0)]
    trainer.train(prompts, progress=False, on_step=lambda row: steps.append(depth[0]))
    assert scopes[0] == ("cpu", False) and set(scopes[1:]) == {("cpu", True)}
    assert steps == [1, 1] and depth[0] == 0  # each loop's callback ran inside its scope
    for run in (trainer.step, trainer.rollout):  # the public pieces of an iteration, for a caller's own loop
        del scopes[:]
        run(prompts)
        assert scopes and set(scopes) == {("cpu", True)}
    batch = trainer.rollout(prompts)["batch"]
    del scopes[:]
    trainer.update(batch)
    assert scopes == [("cpu", True)]
