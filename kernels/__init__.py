"""Triton kernels of rlhf-engine, installed as ``rlhf_engine.kernels``.

Each module holds one kernel family: its ``@triton.jit`` kernels and their launchers only. The autograd
Functions, the PyTorch references and the dispatch live in ``rlhf_engine.ops``; kernels never import the engine.
"""
