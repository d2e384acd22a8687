"""Checkpoints that a crash cannot half-write, and resume from the last complete one.

Layout of ``<output_dir>/checkpoints/step-00000040/``::

    policy/ (critic/, ...)   each trained model as a Hugging Face directory (safetensors), loadable on its own
    trainer_state.pt         optimizer(s), scheduler, RNG states (python, torch, the data sampler's), step
    checkpoint.json          {"step": 40, "phase": "sft", ...}: written last, it marks the checkpoint complete

Everything is written into ``step-XXXXXXXX.tmp-<pid>`` and renamed into place (``os.replace`` on one file system
is atomic), so a reader sees either no checkpoint for that step or a whole one; leftover ``.tmp`` directories
from a killed process are ignored and removed on the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, META_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str, step: int, *, models: dict, state: dict, meta: dict | None = None,
                    keep: int | None = None, tokenizer=None) -> str:
    """Writes models (anything with ``save_pretrained``) and ``state`` for ``step``; returns the final path.

    ``keep`` bounds how many complete checkpoints stay (oldest removed first, never the one just written).
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # debris of a process killed while saving
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    for name, model in models.items():
        model.save_pretrained(os.path.join(tmp, name))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, name))
    torch.save(state, os.path.join(tmp, STATE_FILE))
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump({"step": step, **(meta or {})}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # the same step saved again (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        for _, path in list_checkpoints(output_dir)[:-keep]:
            if path != final:
                shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint_state(path: str) -> tuple[dict, dict]:
    """``(meta, state)`` of a complete checkpoint directory."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a complete checkpoint (no {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    # NOTE: weights_only: loading a checkpoint never runs pickled code (tensors, dicts, tuples and numbers only)
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    return meta, state


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yields an empty temporary directory to fill; on a clean exit it is renamed to ``path`` (the previous
    ``path``, if any, stays whole until the new one is in place), on an error removed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def copy_model_atomic(source: str, path: str) -> str:
    """A copy of the model directory ``source`` at ``path``, through ``atomic_dir``."""
    with atomic_dir(path) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return path
