"""LoRA through peft in every phase: only the adapters train (plus a scalar head), the reference is the policy
with its adapters disabled, the rollout runs the adapted modules, checkpoints hold the adapter and resume it,
and the final model is the merged one."""

import json
import os

import pytest
import torch

from rlhf_engine.cli import main
from rlhf_engine.data.jsonl import PreferenceRecord, SFTRecord, write_jsonl
from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.metrics import read_metrics
from rlhf_engine.models import load_causal_lm
from rlhf_engine.models.heads import CausalLMLogprobs, ScalarHeadModel
from rlhf_engine.models.lora import adapters_disabled, add_lora, as_reference, has_lora, save_adapter
from rlhf_engine.rollout import RolloutEngine, SamplingParams
from rlhf_engine.trainers.dpo import DPOConfig, train_dpo
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_engine.trainers.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "m")
    task.build_tiny_model_dir(path, vocab_size=len(tokenizer), seed=3, hidden_size=32)
    tokenizer.save_pretrained(path)
    return path


def _examples(n, seed=5):
    return [(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(n, seed=seed)]


def _pairs(n, seed):
    import random

    rng = random.Random(seed)
    out = []
    for e in task.make_sft_examples(n, seed=seed):
        words = e.response.split()
        rng.shuffle(words)
        out.append(PreferenceRecord(task.format_prompt(e.prompt), e.response, " ".join(words) + " zzz"))
    return out


def _perturb_adapters(lm, seed=0):
    """B != 0 (peft starts it at 0, so that the adapted model starts as the base): a model that differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids).logits


def test_adapters_start_at_the_base_and_only_they_train(model_dir, tokenizer):
    base = load_causal_lm(model_dir)
    lm = add_lora(load_causal_lm(model_dir), r=4, alpha=8)
    ids = torch.randint(0, len(tokenizer), (2, 11))
    torch.testing.assert_close(_logits(lm, ids), _logits(base, ids), rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    config = SFTConfig(steps=3, batch_size=4, lr=1e-2, max_length=96, warmup_steps=0, lora_r=4, lora_alpha=8)
    train_sft(lm, tokenizer, _examples(16), config, progress=False)
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed), sorted(changed)[:3]
    assert any("lora_B" in n for n in changed)
    assert not torch.allclose(_logits(lm, ids), _logits(base, ids), atol=1e-4)
    with adapters_disabled(lm):  # the base weights never moved: disabled adapters give the base model exactly
        torch.testing.assert_close(_logits(lm, ids), _logits(base, ids), rtol=0, atol=0)
    assert not torch.equal(_logits(lm, ids), _logits(base, ids))  # and they are back after


def test_as_reference_is_eval_mode_and_restores(model_dir):
    lm = add_lora(load_causal_lm(model_dir), r=4, alpha=8, dropout=0.5)
    _perturb_adapters(lm)
    lm.train()
    with as_reference(lm):
        assert not any(m.training for m in lm.modules())
    assert all(m.training for m in lm.modules())


def test_target_modules_that_do_not_exist_are_named(model_dir):
    with pytest.raises(ValueError, match="lora_target_modules.*q_proj"):
        add_lora(load_causal_lm(model_dir), r=4, alpha=8, target_modules=["query_key_value"])
    with pytest.raises(ValueError, match="lora_r must be an int >= 0"):
        SFTConfig(lora_r=-1)
    with pytest.raises(ValueError, match="lora_target_modules"):
        SFTConfig(lora_r=4, lora_target_modules=["all-linear", "q_proj"])


def test_rollout_runs_the_adapted_modules(model_dir, tokenizer):
    """Greedy tokens of the paged rollout equal HF generate of the adapted model (and differ from the base's)."""
    lm = add_lora(load_causal_lm(model_dir), r=4, alpha=16)
    _perturb_adapters(lm, seed=1)
    lm.eval()
    prompt = tokenizer.encode(task.format_prompt(task.make_prompts(1, seed=2)[0]), add_special_tokens=False)
    out = RolloutEngine(lm).generate([prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        adapted = lm.generate(ids, **kwargs)[0, len(prompt):].tolist()
        with adapters_disabled(lm):
            plain = lm.generate(ids, **kwargs)[0, len(prompt):].tolist()
    assert out[0].samples[0].token_ids == adapted
    assert adapted != plain


def test_dpo_reference_is_the_base_model(model_dir, tokenizer):
    """No frozen copy: the reference log-probs are the base model's, whatever the adapters learned."""
    from rlhf_engine.trainers import dpo as dpo_module

    policy = load_causal_lm(model_dir)
    seen = []
    real = dpo_module.sequence_logprobs

    def spy(module, batch, average=False):
        out = real(module, batch, average=average)
        if not torch.is_grad_enabled():
            seen.append((batch, out))
        return out

    dpo_module.sequence_logprobs = spy
    try:
        config = DPOConfig(steps=3, batch_size=4, lr=1e-2, max_length=96, warmup_steps=0, lora_r=4, lora_alpha=8)
        history = train_dpo(policy, tokenizer, _pairs(12, seed=1), config, progress=False)
    finally:
        dpo_module.sequence_logprobs = real
    assert has_lora(policy) and history[-1]["loss"] != history[0]["loss"]
    assert len(seen) == 3  # one reference pass a step
    base = CausalLMLogprobs(load_causal_lm(model_dir)).eval()
    for batch, ref in seen:  # the no-grad passes are the reference's
        expected = real(base, batch)
        torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)


def test_grpo_reference_is_the_policy_with_adapters_disabled(model_dir, tokenizer):
    lm = load_causal_lm(model_dir)
    config = PPOConfig(algorithm="grpo", iterations=3, prompts_per_iteration=2, n_samples=2, max_new_tokens=6,
                       minibatch_size=4, lr=1e-2, seed=1, lora_r=4, lora_alpha=8, reuse_logprobs=False)
    trainer = PPOTrainer(lm, tokenizer, config, reward_fn=lambda p, r: [float(len(x) % 5) for x in r])
    assert trainer.reference is None  # no second copy of the weights
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = [n for n, p in lm.named_parameters() if id(p) in optimized]
    assert names and all("lora_" in n for n in names)
    prompts = [task.format_prompt(p) for p in task.make_prompts(4, seed=0)]
    history = trainer.train(prompts, progress=False)
    assert history[-1]["kl"] > 1e-3  # the adapters moved the policy away from the reference
    batch = trainer.rollout(prompts[:2])["batch"]
    base = CausalLMLogprobs(load_causal_lm(model_dir)).eval()
    with torch.no_grad():
        expected = base(batch["input_ids"], batch["attention_mask"], batch["targets"])
    torch.testing.assert_close(batch["ref_logp"] * batch["mask"], expected * batch["mask"], rtol=1e-5, atol=1e-5)


def test_saved_adapter_loads_in_peft_and_merges(model_dir, tmp_path):
    from peft import PeftModel

    lm = add_lora(load_causal_lm(model_dir), r=4, alpha=8)
    _perturb_adapters(lm, seed=2)
    save_adapter(lm, str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors",
                                                  "lora_settings.json"]
    ids = torch.randint(0, 100, (2, 9))
    other = PeftModel.from_pretrained(load_causal_lm(model_dir), str(tmp_path / "a"))
    torch.testing.assert_close(_logits(other, ids), _logits(lm, ids), rtol=1e-5, atol=1e-5)
    reloaded = load_causal_lm(str(tmp_path / "a"), base=model_dir, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    torch.testing.assert_close(_logits(reloaded, ids), _logits(lm, ids), rtol=0, atol=0)
    assert all(("lora_" in n) == p.requires_grad for n, p in reloaded.named_parameters())
    with pytest.raises(ValueError, match="lora_r: the adapter .* has r = 4 but the config says 8"):
        load_causal_lm(str(tmp_path / "a"), base=model_dir, lora={"r": 8, "alpha": 8, "dropout": 0.0})
    with pytest.raises(ValueError, match="holds a LoRA adapter"):
        load_causal_lm(str(tmp_path / "a"))


# -- the CLI ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_jsonl(str(root / "sft.jsonl"), [SFTRecord(p, r) for p, r in _examples(32)])
    write_jsonl(str(root / "prefs.jsonl"), _pairs(24, seed=2))
    write_jsonl(str(root / "prompts.jsonl"), [{"prompt": task.format_prompt(p)} for p in task.make_prompts(8, 4)])
    (root / "reward.py").write_text("def ascii_share(prompts, responses):\n"
                                    "    return [sum(c.isascii() for c in r) / max(1, len(r)) for r in responses]\n")
    return root


def _cli(*args):
    assert main([*map(str, args), "--no-progress"]) == 0


LORA = ["--lora-r", 4, "--lora-alpha", 8]


def _assert_merged_equals_adapted(out, base_dir, head=False):
    merged = load_causal_lm(str(out / "model"))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    adapted = load_causal_lm(str(out / "adapter"), base=base_dir, lora=lora)
    ids = torch.randint(0, 100, (2, 13))
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), rtol=1e-5, atol=1e-5)
    assert not has_lora(merged) and (out / "model" / "tokenizer.json").exists()
    if head:
        assert ScalarHeadModel.from_pretrained(str(out / "model")).head.weight.shape[0] == 1


def test_every_phase_trains_an_adapter_and_saves_the_merged_model(tmp_path, model_dir, data_files):
    d = data_files
    common = ["--max-length", 128, "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 0, *LORA]
    _cli("sft", "--model", model_dir, "--data", d / "sft.jsonl", "--output-dir", tmp_path / "sft", "--steps", 2,
         *common)
    sft = tmp_path / "sft"
    assert sorted(os.listdir(sft / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    ckpt = sft / "checkpoints" / "step-00000002" / "policy"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    with open(sft / "summary.json") as f:
        assert json.load(f)["adapter"] == str(sft / "adapter")
    _assert_merged_equals_adapted(sft, model_dir)
    _cli("rm", "--model", sft / "model", "--data", d / "prefs.jsonl", "--output-dir", tmp_path / "rm", "--steps", 2,
         *common)
    _assert_merged_equals_adapted(tmp_path / "rm", str(sft / "model"), head=True)
    _cli("dpo", "--model", sft / "model", "--data", d / "prefs.jsonl", "--output-dir", tmp_path / "dpo",
         "--steps", 2, *common)
    _assert_merged_equals_adapted(tmp_path / "dpo", str(sft / "model"))
    ppo = ["--data", d / "prompts.jsonl", "--max-new-tokens", 6, "--prompts-per-iteration", 2, "--minibatch-size", 4,
           *LORA]
    _cli("ppo", "--model", sft / "model", "--reward-model", tmp_path / "rm" / "model", "--output-dir",
         tmp_path / "ppo", "--iterations", 2, *ppo)
    assert (tmp_path / "ppo" / "checkpoints" / "step-00000002" / "critic" / "adapter_config.json").exists()
    _assert_merged_equals_adapted(tmp_path / "ppo", str(sft / "model"))
    _cli("rloo", "--model", sft / "model", "--reward-fn", f"{d / 'reward.py'}:ascii_share", "--output-dir",
         tmp_path / "rloo", "--iterations", 1, "--n-samples", 2, *ppo)
    _assert_merged_equals_adapted(tmp_path / "rloo", str(sft / "model"))


@pytest.mark.parametrize("phase", ["sft", "ppo"])
def test_resume_with_adapters_reproduces_an_uninterrupted_run(tmp_path, model_dir, data_files, phase, capsys):
    d = data_files
    if phase == "sft":
        args = ["sft", "--model", model_dir, "--data", d / "sft.jsonl", "--max-length", 128, "--batch-size", 4,
                "--lr", 1e-2, "--warmup-steps", 0, "--save-every", 2, *LORA]
        length, keys = "--steps", ("loss", "grad_norm")
    else:
        args = ["ppo", "--model", model_dir, "--data", d / "prompts.jsonl", "--reward-fn",
                f"{d / 'reward.py'}:ascii_share", "--max-new-tokens", 6, "--prompts-per-iteration", 2,
                "--minibatch-size", 2, "--lr", 1e-2, "--critic-lr", 1e-2, "--save-every", 2, *LORA]
        length, keys = "--iterations", ("reward_mean", "kl", "policy_loss", "value_loss")
    _cli(*args, "--output-dir", tmp_path / "whole", length, 4)
    _cli(*args, "--output-dir", tmp_path / "parts", length, 4, "--stop-after-steps", 2)
    _cli(*args, "--output-dir", tmp_path / "parts", length, 4, "--resume")
    whole = read_metrics(str(tmp_path / "whole" / "metrics.jsonl"))
    parts = read_metrics(str(tmp_path / "parts" / "metrics.jsonl"))
    assert [[r[k] for k in keys] for r in parts] == [[r[k] for k in keys] for r in whole]
    # a resume with other adapter settings, or none, is refused, naming the key; so is an adapter on a full run's
    for flags, key in (["--lora-r", 8], "lora_r"), (["--lora-target-modules", "q_proj"], "lora_target_modules"), (
            ["--lora-r", 0], "lora_r"):
        again = [*map(str, args), "--output-dir", str(tmp_path / "parts"), length, "6", "--resume", *map(str, flags)]
        capsys.readouterr()
        assert main([*again, "--no-progress"]) == 2
        assert f"{key}: " in capsys.readouterr().err
    full = args[: -len(LORA)]  # (args end with the LoRA flags)
    assert args[-len(LORA):] == LORA
    _cli(*full, "--output-dir", tmp_path / "full", length, 2)
    capsys.readouterr()
    assert main([*map(str, full), *map(str, LORA), "--output-dir", str(tmp_path / "full"), length, "4", "--resume",
                 "--no-progress"]) == 2
    assert "is a checkpoint of full fine-tuning" in capsys.readouterr().err


def test_compute_dtype_rollout_reads_a_merged_shadow(model_dir, tokenizer):
    """bf16 without FSDP: the rollout's shadow is the merged model (no adapter layers), equal to peft's own merge
    cast to bf16, refreshed when the adapters move; the rollout on it equals HF generate on peft's merge."""
    import copy

    from rlhf_engine.models.lora import _tuner_layers
    from rlhf_engine.precision import RolloutWeights

    lm = add_lora(load_causal_lm(model_dir), r=4, alpha=16)
    _perturb_adapters(lm, seed=3)
    weights = RolloutWeights(lm, "bf16")
    assert not _tuner_layers(weights.model) and not has_lora(weights.model)

    def peft_merged():
        merged = copy.deepcopy(lm)
        for layer in _tuner_layers(merged):
            layer.merge()
        return merged

    def assert_matches():
        expected = {n.replace(".base_layer", ""): p for n, p in peft_merged().named_parameters() if "lora_" not in n}
        got = dict(weights.model.named_parameters())
        assert got.keys() == expected.keys()
        for name, p in got.items():
            assert p.dtype == torch.bfloat16
            torch.testing.assert_close(p, expected[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)

    assert_matches()
    assert weights.refresh() is False  # nothing moved
    _perturb_adapters(lm, seed=4)  # an optimizer step on the adapters
    assert weights.refresh() is True
    assert_matches()
    prompt = tokenizer.encode(task.format_prompt(task.make_prompts(1, seed=5)[0]), add_special_tokens=False)
    out = RolloutEngine(weights.model).generate([prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=10))
    reference = peft_merged().to(torch.bfloat16).eval()  # merged layers run their merged weights alone
    with torch.no_grad():
        tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[0, len(prompt):]
    assert out[0].samples[0].token_ids == tokens.tolist()


def test_grpo_in_bf16_with_adapters_rolls_out_on_the_merged_shadow(model_dir, tokenizer):
    from rlhf_engine.models.lora import _tuner_layers

    lm = load_causal_lm(model_dir)
    config = PPOConfig(algorithm="grpo", iterations=2, prompts_per_iteration=2, n_samples=2, max_new_tokens=6,
                       minibatch_size=4, lr=1e-2, seed=1, lora_r=4, lora_alpha=8, precision="bf16")
    trainer = PPOTrainer(lm, tokenizer, config, reward_fn=lambda p, r: [float(len(x) % 5) for x in r])
    assert trainer.engine.model is trainer.rollout_weights.model and not _tuner_layers(trainer.engine.model)
    history = trainer.train([task.format_prompt(p) for p in task.make_prompts(4, seed=0)], progress=False)
    assert all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
    assert trainer.rollout_weights.refresh() is True  # the last update moved the adapters: the shadow follows
    q = lm.model.layers[0].self_attn.q_proj
    merged = q.get_base_layer().weight + q.get_delta_weight("default")
    torch.testing.assert_close(trainer.engine.model.model.layers[0].self_attn.q_proj.weight,
                               merged.to(torch.bfloat16), rtol=0, atol=0)


def test_gpt2_conv1d_projections_adapt_roll_out_and_merge(tmp_path):
    """GPT-2's projections are Conv1D ([in, out] weights): adapted with fan_in_fan_out, rolled out through the
    adapted modules, merged into the shadow the right way round."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_engine.models.lora import _tuner_layers
    from rlhf_engine.precision import RolloutWeights

    config = AutoConfig.for_model("gpt2", vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fan_in_fan_out is set to False" from peft
        add_lora(lm, r=4, alpha=8)
    assert {type(layer.get_base_layer()).__name__ for layer in _tuner_layers(lm)} == {"Conv1D"}
    _perturb_adapters(lm, seed=5)
    prompt = [1, 5, 7, 9]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        adapted = lm.generate(torch.tensor([prompt]), **kwargs)[0, len(prompt):].tolist()
        with adapters_disabled(lm):
            plain = lm.generate(torch.tensor([prompt]), **kwargs)[0, len(prompt):].tolist()
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    assert RolloutEngine(lm).generate([prompt], params)[0].samples[0].token_ids == adapted != plain
    shadow = RolloutWeights(lm, "bf16").model
    c_proj = lm.transformer.h[0].attn.c_proj  # square [32, 32]: a wrong orientation would still fit
    a, b = c_proj.lora_A["default"].weight, c_proj.lora_B["default"].weight  # [r, in], [out, r]
    expected = c_proj.get_base_layer().weight + (b @ a).T * (8 / 4)  # Conv1D holds W as [in, out]
    # within bf16's rounding of each value (half an ulp: 2^-9 relative)
    torch.testing.assert_close(shadow.transformer.h[0].attn.c_proj.weight.float(), expected.detach(),
                               rtol=2**-8, atol=1e-30)


def test_adapters_trained_before_need_a_reference(model_dir, tokenizer):
    """Disabled, adapters that were trained before give the base model, not the policy as it starts: refused
    unless a reference is given."""
    policy = add_lora(load_causal_lm(model_dir), r=4, alpha=8)
    _perturb_adapters(policy)
    config = DPOConfig(steps=1, batch_size=4, max_length=96, lora_r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="train_dpo: the policy carries LoRA adapters trained before"):
        train_dpo(policy, tokenizer, _pairs(4, seed=1), config, progress=False)
    ppo = PPOConfig(algorithm="grpo", iterations=1, prompts_per_iteration=2, n_samples=2, max_new_tokens=4,
                    minibatch_size=4, lora_r=4, lora_alpha=8)
    trainer = PPOTrainer(policy, tokenizer, ppo, reward_fn=lambda p, r: [0.0] * len(r))
    with pytest.raises(ValueError, match="PPOTrainer: the policy carries LoRA adapters trained before"):
        trainer.train(["a prompt"], progress=False)
    with pytest.raises(ValueError, match="lora_dropout = 0.1: the PPO family trains without dropout"):
        PPOConfig(lora_r=4, lora_dropout=0.1)


def test_tied_and_wrapped_models(model_dir, tmp_path):
    """A tied LM head cannot be adapted alone (refused, naming it); a peft PeftModel is taken as its model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    with pytest.raises(ValueError, match="lora_target_modules: .* is tied to"):
        add_lora(AutoModelForCausalLM.from_config(config), r=4, alpha=8, target_modules=["lm_head", "c_attn"])
    wrapped = get_peft_model(load_causal_lm(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _perturb_adapters(wrapped, seed=6)
    rm = ScalarHeadModel(wrapped)
    assert has_lora(rm.lm) and type(rm.lm).__name__ == "LlamaForCausalLM"
    rm.save_pretrained(str(tmp_path / "rm"))
    ids = torch.randint(0, 100, (2, 7))
    again = PeftModel.from_pretrained(load_causal_lm(model_dir), str(tmp_path / "rm"))
    torch.testing.assert_close(_logits(again, ids), _logits(rm.lm, ids), rtol=1e-5, atol=1e-5)
