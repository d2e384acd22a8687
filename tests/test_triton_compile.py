"""The Triton kernel variants a training run launches compile for a GPU that is not here (sm_90: H100 / H200).

The suite runs the kernels under TRITON_INTERPRET=1, which skips what compiled Triton checks: one return type
per function across constexpr branches, the types of loop-carried values, lowering to PTX, shared memory, ptxas.
The ops are called here under the interpreter with the Triton backend forced, over the variants listed in
``_launch_every_variant``; each launch is recorded as the JIT would see it (pointer dtypes, scalar types,
constexprs, ints equal to 1 specialised, the divisibility-by-16 hints, num_warps); then a fresh interpreter
without TRITON_INTERPRET compiles every recorded variant ahead of time for the sm_90 target, to a cubin, with the
ptxas that ships in the triton wheel. No GPU and no driver are needed.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from rlhf_engine.ops import KL_KINDS, POLICY_LOSSES, gae, linear_logprobs, ppo_policy_loss, token_logprobs

_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
            torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1"}


def _variant(fn, args, kwargs) -> dict:
    """One launch of the @triton.jit function ``fn`` as the JIT specialises it."""
    params = inspect.signature(fn).parameters
    bound = {**dict(zip(params, args, strict=False)), **{k: v for k, v in kwargs.items() if k in params}}
    signature, constexprs, divisible = {}, {}, []
    for name, value in bound.items():
        # (a string under `from __future__ import annotations`)
        if "constexpr" in str(params[name].annotation) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER[value.dtype]
            if value.data_ptr() % 16 == 0:  # the JIT's divisibility hint (it vectorises the loads)
                divisible.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the JIT specialises an int argument equal to 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    divisible.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} is not handled here")
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "num_warps": kwargs.get("num_warps", 4)}


def _launch_every_variant():
    """The ops, with the Triton backend, over the variants a training run reaches: log-probs (fwd, bwd; entropy;
    soft-capping; fp32 / bf16 / fp16 logits in the 4096-wide tiles of real vocabularies, fp32 in one small tile),
    linear -> log-probs, every policy loss x KL kind x reference / weights over one T tile (and a few over several),
    dual-clip, GAE."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for v in (33, 5000) if dtype == torch.float32 else (5000,):
            for softcap in (None, 5.0):
                for entropy in (False, True):
                    logits = torch.randn(3, v).to(dtype).requires_grad_()
                    targets = torch.tensor([0, -100, v - 1])
                    out = token_logprobs(logits, targets, return_entropy=entropy, softcap=softcap)
                    (sum(out) if entropy else out).sum().backward()
    one = torch.randn(1, 5000, dtype=torch.bfloat16, requires_grad=True)  # one row: n_rows specialised to 1
    token_logprobs(one, torch.tensor([7])).sum().backward()
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(301, 8, requires_grad=True)
    linear_logprobs(hidden, weight, torch.randint(0, 301, (5,)), return_entropy=True)[0].sum().backward()
    for t in (37, 1100):  # one T tile, and more than one (BLOCK_T is at most 1024)
        logp = torch.randn(2, t, requires_grad=True)
        old, adv, mask = torch.randn(2, t), torch.randn(2, t), torch.rand(2, t) > 0.3
        ref, weights = torch.randn(2, t), torch.rand(2, t)
        for policy in POLICY_LOSSES:
            for kl in [{}] + [{"ref_logp": ref, "kl_coef": 0.1, "kl_kind": kind} for kind in KL_KINDS]:
                for w in (None, weights):
                    if t == 37 or (not kl and w is None):
                        loss, _ = ppo_policy_loss(logp, old, adv, mask, policy_loss=policy, rollout_is_weights=w, **kl)
                        loss.backward()
        ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0)[0].backward()
        gae(torch.randn(2, t), torch.randn(2, t), mask)
    for shape in ((1, 1), (1, 37)):  # one sequence, one token: the counts specialised to 1
        logp = torch.randn(*shape, requires_grad=True)
        ppo_policy_loss(logp, torch.randn(shape), torch.randn(shape), torch.ones(shape, dtype=torch.bool))[0].backward()
        gae(torch.randn(shape), torch.randn(shape), torch.ones(shape))


_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib

target = GPUTarget("cuda", 90, 32)
failed = []
for v in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(v["module"]), v["name"])
    try:
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in v["divisible"]}
        src = ASTSource(fn=fn, signature=v["signature"], constexprs=v["constexprs"], attrs=attrs)
        kernel = triton.compile(src, target=target, options={"num_warps": v["num_warps"]})
        assert kernel.asm.get("cubin"), "no cubin"
    except Exception as err:
        failed.append(f"{v['name']} {v['constexprs']} {v['signature']}: {type(err).__name__}: {str(err)[:400]}")
print(json.dumps(failed))
"""


def test_every_launched_kernel_variant_compiles_for_sm90(monkeypatch, tmp_path):
    launches = {}
    real = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        variant = _variant(self.fn, args, kwargs)
        launches[json.dumps(variant, sort_keys=True)] = variant
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "triton")
    _launch_every_variant()
    names = {v["name"] for v in launches.values()}
    assert names == {"_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_ppo_policy_loss_fwd_kernel",
                     "_gae_kernel"}, names
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TRITON_DEFAULT_FP_FUSION": "1"}
    variants = list(launches.values())
    jobs = max(1, min(2, os.cpu_count() or 1))  # a compile is one core's work: split the variants
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for _ in range(jobs)]
    failed = []
    outs = [p.communicate(json.dumps(variants[i::jobs]), timeout=900) for i, p in enumerate(procs)]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        failed += json.loads(out.strip().splitlines()[-1])
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("value, expected", [(7, "i32"), (1, "constexpr"), (2**40, "i64"), (0.5, "fp32")])
def test_scalars_are_typed_as_the_jit_types_them(value, expected):
    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    variant = _variant(kernel, (torch.zeros(2, dtype=torch.bfloat16), value), {"BLOCK": 64, "num_warps": 8})
    assert variant["signature"] == {"x_ptr": "*bf16", "n": expected, "BLOCK": "constexpr"}
    assert variant["constexprs"] == ({"n": 1, "BLOCK": 64} if value == 1 else {"BLOCK": 64})
    assert variant["num_warps"] == 8
