"""SFT data encoding, the SFT loss through linear_logprobs, and the demo end to end at a small step count."""

import json
import os

import pytest
import torch

from rlhf_engine.data.sft import IGNORE_INDEX, collate_sft, encode_sft
from rlhf_engine.demo import task
from rlhf_engine.demo.run import run_demo
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm, load_tokenizer
from rlhf_engine.trainers.sft import SFTConfig, sft_loss


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def test_byte_tokenizer_round_trips_utf8(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "Un café, s'il vous plaît: 3 € ✓"
    ids = loaded.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert loaded.decode(ids) == text


def test_encode_masks_prompt_and_truncates_response(tokenizer):
    ids, labels = encode_sft(tokenizer, "User: hi\nAssistant:", " hello there", max_length=64)
    n_prompt = 1 + len("User: hi\nAssistant:")
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    ids, labels = encode_sft(tokenizer, "User: hi\nAssistant:", " hello there", max_length=n_prompt + 3)
    assert len(ids) == n_prompt + 3 and labels[-1] != tokenizer.eos_token_id
    with pytest.raises(ValueError, match="max_length"):
        encode_sft(tokenizer, "a long prompt", "x", max_length=4)


def test_sft_loss_equals_hf_cross_entropy(tokenizer, tmp_path):
    path = task.build_tiny_model_dir(str(tmp_path / "m"), vocab_size=len(tokenizer), seed=3)
    model = load_causal_lm(path)
    examples = [(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(4, seed=5)]
    batch = collate_sft([encode_sft(tokenizer, p, r, 96) for p, r in examples], tokenizer.pad_token_id)
    loss, n_tokens = sft_loss(model, batch)
    # HF's own loss: mean token cross-entropy over labels != -100, from the full logits
    hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert n_tokens == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss / n_tokens, hf, atol=1e-5, rtol=1e-5)


def test_sft_config_rejects_bad_values():
    with pytest.raises(ValueError, match="SFTConfig.steps"):
        SFTConfig(steps=0)
    with pytest.raises(ValueError, match="SFTConfig.lr"):
        SFTConfig(lr=0.0)


def test_demo_runs_every_phase(tmp_path):
    out = str(tmp_path / "demo")
    summary = run_demo(out, sft_steps=40, rm_steps=5, ppo_iterations=2, preference_prompts=48, progress=False)
    assert summary["sft_loss_final"] < 3.0  # from about 5.5 at initialisation, after 40 steps
    names = ["summary.json", "curves.png", "preferences.jsonl", "sft/config.json", "tokenizer/tokenizer.json",
             "reward_model/scalar_head.safetensors", "ppo/config.json"]
    names += [f"{phase}_metrics.jsonl" for phase in ("sft", "reward_model", "ppo")]
    for name in names:
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    for key in ("sft_loss_final", "rm_accuracy", "gold_before", "gold_after", "proxy_before", "proxy_after",
                "kl_final"):
        assert isinstance(saved[key], float), key
    assert set(saved["seconds"]) >= {"sft", "reward_model", "ppo"}
    reloaded = load_causal_lm(os.path.join(out, "ppo"))
    assert reloaded.config.vocab_size == len(load_tokenizer(os.path.join(out, "tokenizer")))


def test_loader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(str(tmp_path))
