"""rlhf_engine.integrations.hf against the plain ``model(...).logits`` path (log_softmax + gather), on tiny Llama
and GPT-2 models, left and right padding, with temperature and entropy, both backends; and the stable ops API."""

import inspect

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import rlhf_engine.ops as ops
from rlhf_engine.integrations.hf import collate_rollouts, logprobs_from_model
from rlhf_engine.models.heads import position_ids_for
from rlhf_engine.rollout import RolloutEngine, SamplingParams

VOCAB = 301  # awkward on purpose
STABLE_API = ("token_logprobs", "linear_logprobs", "kl_penalty", "ppo_policy_loss", "value_loss", "gae",
              "group_advantages", "masked_mean", "masked_whiten", "aggregate_loss")
# (dtype, atol, rtol): fp32 differs only by the order of the LM head's reductions; bf16 by rounding the logits
TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (6e-2, 2e-2)}


def build_model(arch: str, dtype=torch.float32):
    torch.manual_seed(7)
    if arch.startswith("llama"):
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        if arch == "llama-bias":  # an LM head with a bias, which linear_logprobs must take too
            model.lm_head = torch.nn.Linear(48, VOCAB, bias=True)
            torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128))
    return model.to(dtype).eval()  # eval: no dropout, so both paths see the same network


def make_batch(padding_side: str, lengths=(19, 12, 7), prompt_lengths=(5, 4, 3)):
    """input_ids / attention_mask / response_mask [B, T]: each row a prompt then a response, then padding."""
    width = max(lengths)
    b = len(lengths)
    input_ids = torch.randint(0, VOCAB, (b, width))
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width), dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        start = 0 if padding_side == "right" else width - n
        attention_mask[i, start : start + n] = 1
        response_mask[i, start + p : start + n] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask, response_mask


def reference(model, input_ids, attention_mask, response_mask, temperature=1.0, position_ids=True):
    """The plain path: full logits from model(...), log_softmax in fp32, gather the next token, mask."""
    kwargs = {"position_ids": position_ids_for(attention_mask)} if position_ids else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    counted = (response_mask[:, 1:] * attention_mask[:, 1:]).bool()
    return torch.where(counted, logp, 0.0), torch.where(counted, entropy, 0.0)


def param_grads(model, fn, g_logp, g_ent):
    model.zero_grad(set_to_none=True)
    logp, entropy = fn()
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "llama-bias", "gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_logits_path(backend, arch, padding_side, temperature):
    model = build_model(arch)
    input_ids, attention_mask, response_mask = make_batch(padding_side)
    atol, rtol = TOLERANCES[torch.float32]

    def ours():
        return logprobs_from_model(model, input_ids, attention_mask, response_mask, temperature=temperature,
                                   return_entropy=True)

    def plain():
        return reference(model, input_ids, attention_mask, response_mask, temperature)

    logp, entropy = ours()
    ref_logp, ref_entropy = plain()
    assert logp.shape == entropy.shape == (input_ids.shape[0], input_ids.shape[1] - 1)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(entropy, ref_entropy, atol=atol, rtol=rtol)
    counted = response_mask[:, 1:].bool()
    assert (logp[~counted] == 0).all() and (logp[counted] < 0).all()

    # gradients w.r.t. every parameter (body and LM head, bias included) under a random upstream gradient
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(entropy)
    grads = param_grads(model, ours, g_logp, g_ent)
    ref_grads = param_grads(model, plain, g_logp, g_ent)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol, msg=name)


def build_transformed(kind: str):
    """Tiny models whose logits are not head(hidden): Gemma 2 soft-caps them (a low cap, so it bends them),
    Granite divides them by logits_scaling, Cohere multiplies them by logit_scale."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    extra = {"gemma2": dict(final_logit_softcapping=2.0, head_dim=12), "granite": dict(logits_scaling=2.5),
             "cohere": dict(logit_scale=0.4)}[kind]
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra))
    with torch.no_grad():  # logits of a few units, so the cap and the scales matter
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_transformed_logits_match_the_models_own(backend, kind):
    model = build_transformed(kind)
    input_ids, attention_mask, response_mask = make_batch("right")

    def ours():
        return logprobs_from_model(model, input_ids, attention_mask, response_mask, return_entropy=True,
                                   temperature=0.8)

    def plain():
        return reference(model, input_ids, attention_mask, response_mask, temperature=0.8)

    logp, entropy = ours()
    ref_logp, ref_entropy = plain()
    torch.testing.assert_close(logp, ref_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-4)
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(entropy)
    grads, ref_grads = param_grads(model, ours, g_logp, g_ent), param_grads(model, plain, g_logp, g_ent)
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # fp32 sums in another order: an error relative to the gradient's own scale
        scale = ref_grads[name].abs().max().item()
        assert (grads[name] - ref_grads[name]).abs().max().item() <= 1e-5 * scale + 1e-6, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_right_padding_needs_no_position_ids(arch):
    """With right padding, positions are 0..n-1 either way: the bare ``model(input_ids, attention_mask)`` agrees."""
    model = build_model(arch)
    batch = make_batch("right")
    logp = logprobs_from_model(model, *batch)
    ref_logp, _ = reference(model, *batch, position_ids=False)
    torch.testing.assert_close(logp, ref_logp, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_does_not_shift_positions(arch):
    """A row's log-probs do not depend on how much left padding precedes it (GPT-2's learned absolute positions
    catch a shift; RoPE alone would not, being relative)."""
    model = build_model(arch)
    input_ids, attention_mask, response_mask = make_batch("left", lengths=(9, 9), prompt_lengths=(3, 3))
    alone = logprobs_from_model(model, input_ids[:1], attention_mask[:1], response_mask[:1])
    padded_ids = torch.cat([torch.zeros((1, 6), dtype=torch.long), input_ids[:1]], dim=1)
    padded_am = torch.cat([torch.zeros((1, 6), dtype=torch.long), attention_mask[:1]], dim=1)
    padded_rm = torch.cat([torch.zeros((1, 6), dtype=torch.long), response_mask[:1]], dim=1)
    padded = logprobs_from_model(model, padded_ids, padded_am, padded_rm)
    torch.testing.assert_close(padded[:, 6:], alone, atol=2e-5, rtol=1e-4)


def test_bfloat16_model():
    model = build_model("llama", torch.bfloat16)
    batch = make_batch("left")
    logp, entropy = logprobs_from_model(model, *batch, return_entropy=True)
    ref_logp, ref_entropy = reference(model, *batch)
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(entropy, ref_entropy, atol=atol, rtol=rtol)


def test_bool_masks_and_padding_inside_response_mask():
    """Bool masks work; a response_mask that covers padding counts only the real tokens."""
    model = build_model("gpt2")
    input_ids, attention_mask, response_mask = make_batch("right")
    logp = logprobs_from_model(model, input_ids, attention_mask.bool(), response_mask.bool())
    sloppy = response_mask.clone()
    sloppy[:, 6:] = 1  # reaches into the padding of the shorter rows
    logp_sloppy = logprobs_from_model(model, input_ids, attention_mask, sloppy)
    counted = (sloppy[:, 1:] * attention_mask[:, 1:]).bool()
    assert (logp_sloppy[~counted] == 0).all()
    torch.testing.assert_close(logp_sloppy[response_mask[:, 1:].bool()], logp[response_mask[:, 1:].bool()])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collate_rollouts_matches_the_sampler(arch, padding_side):
    """The rollout engine's log-probs and the adapter's agree on its own samples (temperature 1)."""
    model = build_model(arch)
    engine = RolloutEngine(model)
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    outputs = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=0))
    batch = collate_rollouts(outputs, pad_token_id=0, padding_side=padding_side)
    b, width = batch["input_ids"].shape
    assert b == 6 and batch["rollout_logprobs"].shape == (b, width - 1)
    assert int(batch["response_mask"].sum()) == sum(len(s.token_ids) for o in outputs for s in o.samples)
    row = 4  # prompt 1, sample 1
    real = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
    assert real == prompts[1] + outputs[1].samples[1].token_ids
    with torch.no_grad():
        logp = logprobs_from_model(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    torch.testing.assert_close(logp, batch["rollout_logprobs"], atol=1e-4, rtol=1e-4)


def test_errors_name_the_argument():
    model = build_model("llama")
    input_ids, attention_mask, response_mask = make_batch("right")
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        logprobs_from_model(model, input_ids.float(), attention_mask, response_mask)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\] with T >= 2"):
        logprobs_from_model(model, input_ids[:, :1], attention_mask[:, :1], response_mask[:, :1])
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\]"):
        logprobs_from_model(model, input_ids[0], attention_mask[0], response_mask[0])
    with pytest.raises(ValueError, match=r"attention_mask shape \(3, 18\) must equal input_ids shape \(3, 19\)"):
        logprobs_from_model(model, input_ids, attention_mask[:, 1:], response_mask)
    with pytest.raises(TypeError, match="response_mask must be bool or an integer dtype.*float32"):
        logprobs_from_model(model, input_ids, attention_mask, response_mask.float())
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        logprobs_from_model(model, input_ids, attention_mask.tolist(), response_mask)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        logprobs_from_model(model, input_ids, attention_mask, response_mask, temperature=0)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 301\).*such position"):
        logprobs_from_model(model, input_ids + VOCAB, attention_mask, response_mask)
    with pytest.raises(ValueError, match=r"no linear LM head"):
        logprobs_from_model(model.model, input_ids, attention_mask, response_mask)


def test_collate_rollouts_errors():
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        collate_rollouts([object()], 0, padding_side="middle")
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        collate_rollouts([object()], None)
    with pytest.raises(TypeError, match=r"outputs\[0\] is a dict, not a RolloutOutput"):
        collate_rollouts([{}], 0)


def test_stable_api_is_documented_and_typed():
    """Every function of the stable API is exported, fully annotated, and documents its shapes."""
    for name in STABLE_API:
        assert name in ops.__all__, name
        fn = getattr(ops, name)
        signature = inspect.signature(fn)
        assert signature.return_annotation is not inspect.Signature.empty, name
        for param in signature.parameters.values():
            assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name})"
        doc = inspect.getdoc(fn) or ""
        assert "[" in doc and len(doc.splitlines()) >= 3, f"{name}: docstring without shapes"
    assert set(ops.__all__) <= set(dir(ops))
