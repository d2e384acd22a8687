"""The rollout engine against Hugging Face generate and a teacher-forced forward of the training model. The models
are on RLHF_ENGINE_TEST_MODEL_DEVICE (`make gpu-check`: cuda; the CPU otherwise)."""

import pytest
import torch
from rollout_reference import DEVICE, assert_logprobs_are_teacher_forced, hf_greedy, random_prompts

from rlhf_engine.models import load_causal_lm
from rlhf_engine.rollout import RolloutEngine, SamplingParams

VOCAB = 97


def tiny_config(kind: str):
    """Tiny random models. NOTE: initializer_range 0.2 (10x the default) spreads the logits, so that greedy
    decoding has no near-ties that two correct summation orders (ours vs HF's cache) could break differently."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           initializer_range=0.2)
    if kind == "mistral":
        return MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             sliding_window=None, initializer_range=0.2)
    if kind == "qwen2":
        return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                           initializer_range=0.2)
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "gpt2"])
def model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(tiny_config(request.param)).save_pretrained(path)
    return load_causal_lm(str(path), device=DEVICE)


def ragged_prompts(seed=0, lengths=(5, 17, 1, 33)):
    return random_prompts(VOCAB, seed, lengths)


def test_greedy_equals_hf_generate(model):
    prompts = ragged_prompts()
    engine = RolloutEngine(model, block_size=4)
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
    for prompt, out in zip(prompts, outputs, strict=True):
        hf = hf_greedy(model, prompt, 12)
        assert out.samples[0].token_ids == hf
        assert out.samples[0].finish_reason == "length"
    assert engine.pool.num_free_blocks() == engine.pool.num_blocks()


def test_logprobs_equal_teacher_forced_forward(model):
    prompts = ragged_prompts(seed=1)
    engine = RolloutEngine(model, block_size=4)
    params = SamplingParams(n=3, temperature=0.8, top_k=20, max_new_tokens=9, seed=7)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        for sample in out.samples:
            assert_logprobs_are_teacher_forced(model, prompt, sample, 0.8)


def test_n_samples_share_one_prefill_and_are_reproducible(model):
    prompts = ragged_prompts(seed=2, lengths=(9, 14))
    engine = RolloutEngine(model, block_size=4)
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=6, seed=3)
    first = engine.generate(prompts, params)
    assert engine.stats["prefill_tokens"] + engine.stats["reused_prefix_tokens"] == sum(map(len, prompts))
    again = engine.generate(prompts, params)
    assert [s.token_ids for o in first for s in o.samples] == [s.token_ids for o in again for s in o.samples]
    distinct = {tuple(s.token_ids) for s in first[0].samples}
    assert len(distinct) > 1
    assert engine.pool.num_free_blocks() == engine.pool.num_blocks()


def test_stop_tokens_and_continuous_batching(model):
    prompts = ragged_prompts(seed=3, lengths=(3, 4, 5, 6, 7, 8))
    engine = RolloutEngine(model, block_size=4, max_num_seqs=4)  # fewer slots than sequences: admission waits
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    stop = greedy[2].samples[0].token_ids[3]
    stopped = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop,)))
    for full, out in zip(greedy, stopped, strict=True):
        tokens = full.samples[0].token_ids
        if stop in tokens:
            cut = tokens.index(stop) + 1
            assert out.samples[0].token_ids == tokens[:cut] and out.samples[0].finish_reason == "stop"
        else:
            assert out.samples[0].token_ids == tokens and out.samples[0].finish_reason == "length"


def test_changed_weights_change_the_next_rollout(model):
    prompts = ragged_prompts(seed=4, lengths=(16, 16))
    engine = RolloutEngine(model, block_size=4)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = engine.generate(prompts, params)
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.add_(torch.randn_like(head) * 0.5)  # what an optimizer step does: an in-place update
        after = engine.generate(prompts, params)
        assert after[0].samples[0].token_ids == hf_greedy(model, prompts[0], 6)
        assert [o.samples[0].token_ids for o in before] != [o.samples[0].token_ids for o in after]
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_bad_inputs_are_named(model):
    engine = RolloutEngine(model, block_size=4, max_num_blocks=2)
    with pytest.raises(ValueError, match="max_num_blocks"):
        engine.generate([[1] * 20], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"prompts\[1\].*outside"):
        RolloutEngine(model).generate([[1], [VOCAB]], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        RolloutEngine(model).generate([[1] * 250], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        SamplingParams(top_p=0.0)


def test_unsupported_architecture_is_named():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="'bloom' .* does not route its attention through transformers' attention"):
        RolloutEngine(model)


def flash_attn_with_kvcache_reference(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale, causal,
                                      window_size=(-1, -1), softcap=0.0):
    """flash-attn's documented semantics for q of one token a sequence: q (B, 1, H, D) attends to the first
    cache_seqlens[b] positions of the pages block_table[b] of k_cache/v_cache (num_blocks, page, KV, D)."""
    assert q.dim() == 4 and q.shape[1] == 1 and causal
    assert cache_seqlens.dtype == torch.int32 and block_table.dtype == torch.int32
    assert window_size[1] in (-1, 0)  # causal: nothing to the right
    out = []
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        first = max(0, n - 1 - window_size[0]) if window_size[0] >= 0 else 0  # window_size[0] tokens left of q
        k = k_cache[block_table[b].long()].flatten(0, 1)[first:n]  # (n', KV, D)
        v = v_cache[block_table[b].long()].flatten(0, 1)[first:n]
        group = q.shape[2] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,thd->hqt", q[b].float(), k.float()) * softmax_scale  # (H, 1, n')
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        out.append(torch.einsum("hqt,thd->qhd", scores.softmax(-1), v.float()).to(q.dtype))  # (1, H, D)
    return torch.stack(out)


def test_flash_decode_path_gives_the_paged_result(model):
    """The flash-attn decode call (block table, int32 lengths, new K/V already in the cache) against flash-attn's
    semantics, on CPU: the same greedy tokens as the _C paged attention."""
    prompts = ragged_prompts()
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=2)
    paged = RolloutEngine(model, attention="paged")
    flash = RolloutEngine(model, attention="paged", block_size=256)
    flash._flash = flash_attn_with_kvcache_reference
    assert flash.attention == "flash" and paged.attention == "paged"
    ours = [[s.token_ids for s in o.samples] for o in flash.generate(prompts, params)]
    assert ours == [[s.token_ids for s in o.samples] for o in paged.generate(prompts, params)]


def test_flash_attention_names_what_is_missing(model):
    needs = "needs CUDA" if DEVICE == "cpu" else "needs float16 or bfloat16"  # the fp32 test models
    with pytest.raises(ValueError, match=f"attention='flash' cannot run: .*{needs}"):
        RolloutEngine(model, attention="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        RolloutEngine(model, attention="sdpa")
    assert RolloutEngine(model).attention == "paged" and RolloutEngine(model).block_size == 16
