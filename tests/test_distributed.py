"""Data parallelism on CPU (gloo, 2 processes): an SFT step and a GRPO update at world size 2 (FSDP2 and DDP) give
the parameters of world size 1 on the same global batch, and a checkpoint written at world size 2 resumes at
world size 1 with the metrics of an uninterrupted run."""

import os
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_engine.cli import main
from rlhf_engine.data.jsonl import PreferenceRecord, SFTRecord, read_jsonl, write_jsonl
from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.distributed import collective_device, exit_process, full_state, init_distributed
from rlhf_engine.metrics import read_metrics
from rlhf_engine.models import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    """One rank: ``fn(*args)``, the process group ended, then the exit the CLI takes (``exit_process``: a return
    would let the interpreter's teardown race the backend's threads; see rlhf_engine.distributed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # FSDP2 warns when a wrapped module returns a view (an in-place op on it could skip its hooks): ours must not
    warnings.filterwarnings("error", message="FSDP2-wrapped module")
    status = 0
    try:
        fn(*args)
    except BaseException:
        traceback.print_exc()  # the parent sees the exit status; the traceback goes to the captured stderr
        status = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    exit_process(status)


def _spawn(fn, *args, world=2):
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tokenizer = build_byte_tokenizer()
    model_dir = str(root / "model")
    task.build_tiny_model_dir(model_dir, vocab_size=len(tokenizer), seed=3, hidden_size=32)
    tokenizer.save_pretrained(model_dir)
    data = str(root / "sft.jsonl")
    write_jsonl(data, [SFTRecord(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(32, 5)])
    pairs = [PreferenceRecord(task.format_prompt(e.prompt), e.response, e.response.upper())
             for e in task.make_sft_examples(32, 6)]
    write_jsonl(str(root / "prefs.jsonl"), pairs)
    return root, model_dir, data


def _close(a: dict, b: dict, atol=1e-5):
    """Parameters within 1e-5. NOTE: the steps use lr 1e-3: Adam's first update is lr * g / (|g| + eps), which
    turns reduction-order noise in near-zero gradients into differences of up to lr, whatever the world size."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


# -- one SFT step ------------------------------------------------------------------------------------------------


def _with_lora(model, common: dict, trained: bool = True):
    """The same adapters on every rank and at world size 1; ``trained``: B != 0, so that A has a gradient too
    (DPO refuses that without a reference: its reference is the model with its adapters disabled)."""
    from rlhf_engine.models.lora import add_lora

    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8)
    if trained:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
    common.update(lora_r=4, lora_alpha=8)


def _offline_step(phase, model_dir, root, strategy, out, lora=False):
    from rlhf_engine.models.heads import ScalarHeadModel
    from rlhf_engine.trainers import DPOConfig, RewardConfig, SFTConfig, train_dpo, train_reward_model, train_sft

    info = init_distributed(strategy, torch.device("cpu"))
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    common = dict(steps=1, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=0, max_length=128, strategy=strategy)
    if lora:
        _with_lora(model, common, trained=phase != "dpo")
    if phase == "sft":
        rows = train_sft(model, tokenizer, read_jsonl(str(root / "sft.jsonl"), "sft"), SFTConfig(**common),
                         progress=False, dist=info)
    elif phase == "rm":
        torch.manual_seed(0)
        model = ScalarHeadModel(model)
        rows = train_reward_model(model, tokenizer, read_jsonl(str(root / "prefs.jsonl"), "preferences"),
                                  RewardConfig(**common), progress=False, dist=info)
    else:
        rows = train_dpo(model, tokenizer, read_jsonl(str(root / "prefs.jsonl"), "preferences"),
                         DPOConfig(**common, beta=0.5), progress=False, dist=info)
    state, _ = full_state(model)
    if info.is_main:
        torch.save({"state": state, "row": rows[-1]}, out)


@pytest.mark.parametrize("phase, strategy, lora", [("sft", "fsdp", False), ("sft", "ddp", False), ("rm", "fsdp", False),
                                                   ("dpo", "ddp", False), ("sft", "fsdp", True), ("rm", "ddp", True),
                                                   ("dpo", "fsdp", True), ("dpo", "ddp", True)])
def test_offline_step_matches_world_size_1(setup, phase, strategy, lora):
    """(With LoRA: only the adapters and the reward model's head train; DPO's reference is the policy with its
    adapters disabled, a no-grad pass through the sharded module.)"""
    root, model_dir, _ = setup
    tag = f"{phase}-lora" if lora else phase
    _offline_step(phase, model_dir, root, "none", str(root / f"{tag}1.pt"), lora)
    _spawn(_offline_step, phase, model_dir, root, strategy, str(root / f"{tag}2-{strategy}.pt"), lora)
    one, two = torch.load(str(root / f"{tag}1.pt")), torch.load(str(root / f"{tag}2-{strategy}.pt"))
    count = "tokens" if phase == "sft" else "pairs"
    assert two["row"][count] == one["row"][count]  # the same global batch, counted over both ranks
    assert abs(two["row"]["loss"] - one["row"]["loss"]) < 1e-5
    _close(one["state"], two["state"])


# -- one GRPO update ---------------------------------------------------------------------------------------------


def _global_batch(model_dir):
    """A fixed global batch of 8 sequences as a rollout would leave it (ragged responses, right padding)."""
    from rlhf_engine.models.heads import CausalLMLogprobs, position_ids_for

    g = torch.Generator().manual_seed(0)
    model = load_causal_lm(model_dir)
    b, width, prompt = 8, 14, 4
    input_ids = torch.randint(0, 256, (b, width), generator=g)
    lengths = torch.randint(prompt + 2, width + 1, (b,), generator=g)
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    targets = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], -100)
    targets[:, : prompt - 1] = -100
    mask = targets != -100
    with torch.no_grad():
        logp = CausalLMLogprobs(model)(input_ids, attention_mask, targets,
                                       position_ids=position_ids_for(attention_mask))
    old = logp + 0.3 * torch.randn(logp.shape, generator=g) * mask  # some ratios leave the clip range
    advantages = torch.randn(b, generator=g)[:, None].expand_as(logp) * mask
    return dict(input_ids=input_ids, attention_mask=attention_mask, targets=targets, mask=mask, old_logp=old,
                ref_logp=old - 0.1 * mask, rollout_logp=old, advantages=advantages)


def _grpo_update(model_dir, strategy, out, lora=False):
    from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer

    info = init_distributed(strategy, torch.device("cpu"))
    batch = {k: v[info.rank :: info.world_size] for k, v in _global_batch(model_dir).items()}
    policy, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    extra = {}
    if lora:
        _with_lora(policy, extra)
    config = PPOConfig(algorithm="grpo", n_samples=2, prompts_per_iteration=4, minibatch_size=8, ppo_epochs=1,
                       lr=1e-3, kl_coef=0.1, strategy=strategy, **extra)
    trainer = PPOTrainer(policy, tokenizer, config, reward_fn=lambda p, r: [0.0] * len(r), dist=info)
    stats = trainer.update(batch)
    state, _ = full_state(policy)
    if info.is_main:
        torch.save({"state": state, "stats": stats}, out)


@pytest.mark.parametrize("strategy, lora", [("fsdp", False), ("ddp", False), ("fsdp", True), ("ddp", True)])
def test_grpo_update_matches_world_size_1(setup, strategy, lora):
    root, model_dir, _ = setup
    tag = "grpo-lora" if lora else "grpo"
    _grpo_update(model_dir, "none", str(root / f"{tag}1.pt"), lora)
    _spawn(_grpo_update, model_dir, strategy, str(root / f"{tag}2-{strategy}.pt"), lora)
    one, two = torch.load(str(root / f"{tag}1.pt")), torch.load(str(root / f"{tag}2-{strategy}.pt"))
    assert one["stats"]["clipfrac"] > 0  # the clip is exercised
    _close(one["state"], two["state"])


# -- checkpoints across world sizes --------------------------------------------------------------------------------


def _cli(args):
    assert main(args) == 0


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_from_world_size_2_resumes_at_world_size_1(setup, lora):
    """(With LoRA the checkpoint holds the adapter, gathered from the shards; model/ is the merged model.)"""
    root, model_dir, data = setup
    args = ["sft", "--model", model_dir, "--data", data, "--batch-size", "4", "--max-length", "128", "--lr", "1e-2",
            "--warmup-steps", "0", "--save-every", "2", "--no-progress"]
    if lora:
        args += ["--lora-r", "4", "--lora-alpha", "8"]
    root = root / ("lora" if lora else "full")
    _cli([*args, "--steps", "4", "--output-dir", str(root / "whole")])
    _spawn(_cli, [*args, "--steps", "4", "--stop-after-steps", "2", "--strategy", "fsdp", "--output-dir",
                  str(root / "moved")])
    _cli([*args, "--steps", "4", "--resume", "--output-dir", str(root / "moved")])
    assert (root / "moved" / "adapter").exists() == lora
    whole = read_metrics(str(root / "whole" / "metrics.jsonl"))
    moved = read_metrics(str(root / "moved" / "metrics.jsonl"))
    assert [r["step"] for r in moved] == [0, 1, 2, 3]
    for a, b in zip(whole, moved, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["tokens"] == b["tokens"]
    _close(load_causal_lm(str(root / "whole" / "model")).state_dict(),
           load_causal_lm(str(root / "moved" / "model")).state_dict())


# -- rollout on sharded parameters -------------------------------------------------------------------------------


WORKLOADS = [([[257, 10, 20, 30], [257, 40, 50]], 8), ([[257, 60], [257, 70, 80, 90, 11]], 3)]


def _greedy(model_dir, strategy, out):
    """Rank r rolls out workload r (a different number of decode steps on each rank: a collective inside the
    forward would hang); at world size 1, both."""
    from rlhf_engine.distributed import gathered, wrap
    from rlhf_engine.models.heads import CausalLMLogprobs
    from rlhf_engine.rollout import RolloutEngine, SamplingParams

    info = init_distributed(strategy, torch.device("cpu"))
    model = load_causal_lm(model_dir)
    module = wrap(CausalLMLogprobs(model), info)
    engine = RolloutEngine(model)
    mine = WORKLOADS if not info.enabled else [WORKLOADS[info.rank]]
    tokens = []
    with gathered(module):
        for prompts, new in mine:
            params = SamplingParams(temperature=0.0, max_new_tokens=new)
            tokens.append([o.samples[0].token_ids for o in engine.generate(prompts, params)])
    sharded = type(model.lm_head.weight).__name__
    torch.save({"tokens": tokens, "param_type": sharded}, f"{out}-{info.rank}")


def test_rollout_reads_gathered_fsdp_parameters(setup):
    """The model's own modules, run on a hook-free view of the gathered FSDP units."""
    root, model_dir, _ = setup
    _greedy(model_dir, "none", str(root / "greedy1"))
    _spawn(_greedy, model_dir, "fsdp", str(root / "greedy2"))
    one = torch.load(str(root / "greedy1-0"))
    for rank in (0, 1):
        two = torch.load(str(root / f"greedy2-{rank}"))
        assert two["tokens"] == [one["tokens"][rank]]
        assert two["param_type"] == "DTensor"  # sharded again once the rollout is over


def test_grpo_cli_at_world_size_2(setup, tmp_path):
    root, model_dir, _ = setup
    prompts = str(tmp_path / "prompts.jsonl")
    write_jsonl(prompts, [{"prompt": task.format_prompt(p)} for p in task.make_prompts(8, 4)])
    reward = tmp_path / "reward.py"
    reward.write_text("def score(prompts, responses):\n    return [float(len(r) % 7) for r in responses]\n")
    _spawn(_cli, ["grpo", "--model", model_dir, "--data", prompts, "--reward-fn", f"{reward}:score", "--output-dir",
                  str(tmp_path / "out"), "--iterations", "2", "--n-samples", "2", "--prompts-per-iteration", "4",
                  "--minibatch-size", "4", "--max-new-tokens", "6", "--strategy", "fsdp", "--no-progress"])
    rows = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1] and all(r["logprob_mismatch_max"] < 1e-3 for r in rows)
    assert load_causal_lm(str(tmp_path / "out" / "model")).config.vocab_size == 259


def test_grpo_dynamic_sampling_at_world_size_2(setup, tmp_path):
    """Ranks keep different numbers of informative groups and run refill rounds together (FSDP's gather in each
    is a collective): they must agree on the rounds and the batch, or the run hangs or dies."""
    root, model_dir, _ = setup
    prompts = str(tmp_path / "prompts.jsonl")
    base = [task.format_prompt(p) for p in task.make_prompts(8, 4)]
    write_jsonl(prompts, [{"prompt": p + ("#" if i % 2 else "")} for i, p in enumerate(base)])
    reward = tmp_path / "reward.py"
    reward.write_text("def score(prompts, responses):\n"
                      "    pairs = zip(prompts, responses)\n"
                      "    return [0.5 if p.endswith('#') else float(len(r) % 7) for p, r in pairs]\n")
    _spawn(_cli, ["grpo", "--model", model_dir, "--data", prompts, "--reward-fn", f"{reward}:score", "--output-dir",
                  str(tmp_path / "out"), "--iterations", "3", "--n-samples", "2", "--prompts-per-iteration", "4",
                  "--minibatch-size", "4", "--max-new-tokens", "6", "--strategy", "fsdp", "--dynamic-sampling",
                  "true", "--max-sampling-rounds", "4", "--no-progress"])
    rows = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sum(r["groups_dropped"] for r in rows) > 0 and all(r["sampling_rounds"] <= 4 for r in rows)


# -- collectives --------------------------------------------------------------------------------------------------


def test_collective_device_follows_the_backend():
    assert collective_device("gloo") == torch.device("cpu")
    assert collective_device("cpu:gloo") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            collective_device("nccl")


def _reduce_stats(out):
    info = init_distributed("fsdp", torch.device("cpu"))
    calls = []
    original = dist.all_gather

    def counted(*args, **kwargs):
        calls.append(args[1].device)
        return original(*args, **kwargs)

    dist.all_gather = counted
    try:
        stats = info.reduce_stats({"a": 1.0 + info.rank, "b": 2.0}, {"m_max": 10.0 * info.rank, "n_max": -info.rank})
    finally:
        dist.all_gather = original
    if info.is_main:
        torch.save({"stats": stats, "calls": calls, "device": info.device}, out)


def _whiten_halves(out):
    from rlhf_engine.ops import masked_whiten

    info = init_distributed("ddp", torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    values, mask = torch.randn(6, 9, generator=gen), torch.rand(6, 9, generator=gen) > 0.3
    rows = slice(3 * info.rank, 3 * info.rank + 3)
    half = masked_whiten(values[rows], mask[rows], all_reduce=info.all_reduce)
    torch.save({"half": half, "whole": masked_whiten(values, mask)[rows]}, f"{out}.{info.rank}")


def test_masked_whiten_over_ranks_equals_the_whole_batch(tmp_path):
    _spawn(_whiten_halves, str(tmp_path / "w"))
    for rank in range(2):
        got = torch.load(tmp_path / f"w.{rank}")
        torch.testing.assert_close(got["half"], got["whole"], atol=1e-5, rtol=1e-5)


def test_reduce_stats_is_one_collective_on_the_group_device(tmp_path):
    _spawn(_reduce_stats, str(tmp_path / "stats.pt"))
    out = torch.load(str(tmp_path / "stats.pt"))
    assert out["stats"] == {"a": 3.0, "b": 4.0, "m_max": 10.0, "n_max": 0.0}
    assert out["calls"] == [out["device"]] == [torch.device("cpu")]


def test_no_collective_outside_the_distributed_module():
    """Every collective goes through DistInfo, whose tensors live on the group's device (NCCL takes no CPU
    tensors): none may be called on torch.distributed directly elsewhere in the package."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "rlhf_engine"
    ops = r"\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|reduce|gather|scatter|barrier)\("
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.name == "distributed.py":
            continue
        # `dist` is torch.distributed only where the module imports it so (elsewhere it names a DistInfo)
        names = r"torch\.distributed" + (r"|(?<![.\w])dist" if "import torch.distributed as dist" in text else "")
        pattern = re.compile(rf"\b({names}){ops}")
        offenders += [f"{path.relative_to(root)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                      if pattern.search(line)]
    assert offenders == []
