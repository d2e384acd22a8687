"""gradient_checkpointing: transformers' own, under the fused log-prob head, in the offline phases and PPO: the
decoder layers are recomputed in the backward, and the training is the same as without."""

import pytest
import torch

from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_engine.trainers.sft import SFTConfig, train_sft


@pytest.fixture()
def model_dir(tmp_path):
    tokenizer = build_byte_tokenizer()
    return task.build_tiny_model_dir(str(tmp_path / "m"), vocab_size=len(tokenizer), seed=3, hidden_size=32), tokenizer


def count_mlp_calls(model) -> list:
    calls = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    return calls


def test_sft_recomputes_layers_and_trains_the_same(model_dir):
    path, tokenizer = model_dir
    examples = [{"prompt": f"Count to {i}:", "response": " " + " ".join(str(j) for j in range(i))} for i in range(2, 9)]
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(path)
        calls = count_mlp_calls(model)
        config = SFTConfig(steps=3, batch_size=4, lr=1e-3, max_length=64, gradient_checkpointing=checkpointing)
        history = train_sft(model, tokenizer, examples, config, progress=False)
        runs[checkpointing] = (history, dict(model.named_parameters()), len(calls))
    (plain, plain_params, plain_calls), (ckpt, ckpt_params, ckpt_calls) = runs[False], runs[True]
    assert ckpt_calls == 2 * plain_calls  # every layer ran again in the backward
    for a, b in zip(plain, ckpt, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    for name, p in plain_params.items():  # recomputation is the same arithmetic: a few ulps at most
        torch.testing.assert_close(ckpt_params[name], p, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_grpo_with_gradient_checkpointing(model_dir, share_prompts):
    """(With share_prompts, the checkpointed training forward runs unshared: checkpointing drops the prompt's
    cache the shared forward reads.)"""
    path, tokenizer = model_dir
    prompts = [task.format_prompt(p) for p in task.make_prompts(4, seed=0)]
    firsts, counts = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(path)
        calls = count_mlp_calls(model)
        config = PPOConfig(algorithm="grpo", iterations=1, prompts_per_iteration=2, n_samples=2, max_new_tokens=6,
                           minibatch_size=4, ppo_epochs=1, reuse_logprobs=False, share_prompts=share_prompts, seed=1,
                           gradient_checkpointing=checkpointing)
        trainer = PPOTrainer(model, tokenizer, config, reward_fn=lambda p, r: [float(len(x) % 5) for x in r])
        firsts[checkpointing] = trainer.train(prompts, progress=False)[0]
        counts[checkpointing] = len(calls)
        # the layers are back in eval mode after the update: a later no-grad pass keeps its KV cache
        assert not any(m.training for m in model.modules())
    # the one training forward's layers ran again in the backward; the no-grad passes (old and reference
    # log-probs) ran as before
    if not share_prompts:
        assert counts[True] == counts[False] + len(model.model.layers)
    for key in ("policy_loss", "grad_norm", "reward_mean"):
        assert firsts[True][key] == pytest.approx(firsts[False][key], rel=1e-4, abs=1e-6), key
