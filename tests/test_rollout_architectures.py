"""The rollout on the model's own transformers modules (``hf_bridge``) across architectures: greedy tokens equal
HF ``generate``, sampled log-probs equal a teacher-forced forward, one prefill shared by the n samples, several
prompts prefilled in one forward. Tiny random configs built locally (nothing downloaded), the models on
RLHF_ENGINE_TEST_MODEL_DEVICE (`make gpu-check`: cuda; the CPU otherwise)."""

import pytest
import torch
from rollout_reference import DEVICE, assert_logprobs_are_teacher_forced, hf_greedy, random_prompts

from rlhf_engine.rollout import RolloutEngine, SamplingParams

VOCAB = 97
# every config: 2 layers, hidden 32, 4 heads of 8 (2 KV heads where the architecture has GQA); initializer_range
# 0.2 (10x the default) spreads the logits, so that greedy decoding has no near-ties that two correct summation
# orders could break differently
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, initializer_range=0.2)
GQA = dict(num_key_value_heads=2)
ARCHITECTURES = {
    "llama": {**GQA},
    "mistral": {**GQA, "sliding_window": 8},  # shorter than the prompts: the window is exercised
    "qwen2": {"num_key_value_heads": 1},
    "qwen3": {**GQA, "head_dim": 8},  # q/k norms
    "qwen3_moe": {**GQA, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "decoder_sparse_step": 1},
    "mixtral": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    # sliding and full layers alternating, a non-default attention scale
    "gemma3_text": {**GQA, "head_dim": 8, "query_pre_attn_scalar": 12, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
    # attention and final logit soft-capping (tight caps: most scores bend), alternating windows
    "gemma2": {**GQA, "head_dim": 8, "query_pre_attn_scalar": 12, "sliding_window": 8,
               "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0,
               "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {**GQA, "pad_token_id": 0},
    "olmo2": {**GQA},
    "granite": {**GQA, "attention_multiplier": 0.3, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                "logits_scaling": 4.0},  # non-default attention scaling and logit scale
    "gpt_neox": {"rotary_pct": 0.5},  # partial rotary
    "gpt2": None,
}


def build(kind: str, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_engine.models import load_causal_lm

    if kind == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      initializer_range=0.2)
    else:
        config = AutoConfig.for_model(kind, **COMMON, **ARCHITECTURES[kind])
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return load_causal_lm(str(tmp_path), device=DEVICE).eval()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


def prompts(seed=0, lengths=(5, 17, 1, 33)):
    return random_prompts(VOCAB, seed, lengths, low=1)  # no 0: the pad / eos id of these configs


def test_greedy_equals_hf_generate(model):
    batch = prompts()
    engine = RolloutEngine(model, block_size=4)
    outputs = engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=10))
    for prompt, out in zip(batch, outputs, strict=True):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 10)
    assert engine.stats["forward_calls"] == 1 + 9  # every prompt prefilled in one forward, then 9 decode steps
    assert engine.pool.num_free_blocks() == engine.pool.num_blocks()


def test_sampled_logprobs_equal_a_teacher_forced_forward(model):
    batch = prompts(seed=1, lengths=(9, 14))
    engine = RolloutEngine(model, block_size=4)
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=7, seed=5)
    outputs = engine.generate(batch, params)
    # one prefill for the n samples of each prompt
    assert engine.stats["prefill_tokens"] + engine.stats["reused_prefix_tokens"] == sum(map(len, batch))
    for prompt, out in zip(batch, outputs, strict=True):
        for sample in out.samples:
            assert_logprobs_are_teacher_forced(model, prompt, sample, 0.8)


def test_a_shared_prefix_is_reused_within_one_prefill(model):
    """Two prompts with the same 8 leading tokens admitted together: the second reuses the first's blocks, which
    the same forward writes before it reads them."""
    head = prompts(seed=2, lengths=(8,))[0]
    batch = [head + [3, 4, 5], head + [6, 7]]
    engine = RolloutEngine(model, block_size=4)
    outputs = engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert engine.stats["reused_prefix_tokens"] == 8
    for prompt, out in zip(batch, outputs, strict=True):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 6)


def test_the_training_attention_is_back_after_a_rollout(model):
    before = model.config._attn_implementation
    RolloutEngine(model).generate(prompts(lengths=(3,)), SamplingParams(temperature=0.0, max_new_tokens=2))
    assert model.config._attn_implementation == before


def test_refused_architectures_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="encoder-decoder"):
        from transformers import T5Config, T5ForConditionalGeneration

        t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                 d_kv=8))
        RolloutEngine(t5)


def test_the_readme_table_lists_the_tested_architectures():
    """The README's table of supported architectures is this file's list: neither claims one the other lacks."""
    import os
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("| architecture | what it exercises |"):]
    table = table[: table.index("\n\n")]
    listed = {name.strip() for row in table.splitlines()[2:] for name in row.split("|")[1].split(",")}
    assert listed == set(ARCHITECTURES), (sorted(listed), sorted(ARCHITECTURES))
    assert re.search(rf"\b{len(ARCHITECTURES)} architectures token-for-token equal to HF greedy", readme)


def test_attention_terms_the_kernels_lack_are_refused(tmp_path):
    """gpt-oss adds attention sinks (``s_aux``): dropping them would roll out another model, so it is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_oss", **COMMON, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                  num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                  sliding_window=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="passes s_aux to its attention"):
        RolloutEngine(model).generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=2))


def test_a_failed_prefill_leaves_no_blocks_behind(model, monkeypatch):
    """allocate_prompt keys a prompt's blocks before their KV exists: a prefill that fails frees them and drops
    the keys, so the next rollout recomputes instead of reading empty blocks."""
    from rlhf_engine.rollout import hf_bridge

    batch = prompts(seed=6, lengths=(13, 9))
    engine = RolloutEngine(model, block_size=4)
    real = hf_bridge.forward

    def failing(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(hf_bridge, "forward", failing)
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=4))
    monkeypatch.setattr(hf_bridge, "forward", real)
    assert engine.pool.num_free_blocks() == engine.pool.num_blocks()
    outputs = engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=4))
    assert engine.stats["reused_prefix_tokens"] == 0
    for prompt, out in zip(batch, outputs, strict=True):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 4)


def test_max_prefill_tokens_splits_the_packed_prefill(model):
    batch = prompts()  # 5, 17, 1, 33 tokens
    engine = RolloutEngine(model, block_size=4, max_prefill_tokens=20)
    outputs = engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=3))
    # (5 + 17 + 1 = 23 > 20): [5] [17, 1] ... admitted in order within the cap, the 33-token prompt alone
    assert engine.stats["forward_calls"] > 1 + 2
    for prompt, out in zip(batch, outputs, strict=True):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 3)


def test_attention_softcapping_the_training_attention_drops_is_refused(tmp_path, monkeypatch):
    """transformers 5.17 loads Gemma 2 with SDPA, which drops attn_logit_softcapping (5.24 refuses SDPA for it):
    load_causal_lm loads such a model with eager attention, and the rollout refuses one running on SDPA."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

    monkeypatch.setattr(Gemma2PreTrainedModel, "_supports_sdpa", True)  # what transformers 5.17 declares
    model = build("gemma2", tmp_path)  # saved, then loaded by load_causal_lm
    assert model.config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=2\.0\), which its attention implementation 'sdpa'"):
        RolloutEngine(model)
