"""Scoring with a reward function: in this process or in worker processes, with a timeout and an error score.

    scorer = RewardScorer(fn, workers=4, timeout=30.0, on_error=0.0)
    pending = scorer.submit(prompts, responses, fields)   # returns at once with workers
    ...                                                    # the reference / old log-prob passes run meanwhile
    scores, errors, extras = pending.result()              # [N] fp32, samples scored on_error, logged means
    scorer.close()                                         # the workers end (also at the end of training)

A function is per batch, ``fn(prompts, responses, **fields) -> list[float]``, or per sample,
``fn(prompt, response, **fields) -> float``: told apart by the names of its first two parameters (``prompt`` and
``response``, singular, mean per sample). Workers are spawned processes, each loading the function itself: by its
``module:function`` / ``file.py:function`` spec, or by pickle (a module-level function). A batch is split into one
chunk per worker.
"""

from __future__ import annotations

import inspect
import multiprocessing
import time
import traceback

import torch

from rlhf_engine.rewards.functions import _name, call_reward_fn


def is_per_sample(fn) -> bool:
    """True when ``fn``'s first two parameters are named ``prompt`` and ``response`` (one sample a call)."""
    try:
        names = list(inspect.signature(fn).parameters)[:2]
    except (TypeError, ValueError):
        return False
    return names == ["prompt", "response"]


def _score_chunk(fn, prompts, responses, fields, on_error) -> tuple[list[float], int, str | None, dict]:
    """Scores of one chunk, the count scored ``on_error``, the first failure's text (None: none) and the logged
    extras (name -> values)."""
    if not is_per_sample(fn):
        try:
            scores, extras = call_reward_fn(fn, prompts, responses, fields)
            return scores.tolist(), 0, None, extras
        except Exception:
            if on_error is None:
                raise
            return [on_error] * len(responses), len(responses), traceback.format_exc(), {}
    scores, errors, first, extras = [], 0, None, {}
    for i, (prompt, response, row) in enumerate(zip(prompts, responses, fields, strict=True)):
        try:
            score, extra = call_reward_fn(_PerSample(fn), [prompt], [response], [row])
            score = float(score[0])
            for key, values in extra.items():
                extras.setdefault(key, []).extend(values)
        except Exception as err:
            if on_error is None:
                raise RuntimeError(f"on sample {i} (prompt {prompt[:80]!r}): {err}") from err
            score, errors = on_error, errors + 1
            first = first or f"sample {i} (prompt {prompt[:80]!r}):\n{traceback.format_exc()}"
        scores.append(score)
    return scores, errors, first, extras


class _PerSample:
    """A per-sample function seen as a batch function of one sample (so call_reward_fn checks it alike)."""

    def __init__(self, fn):
        self.fn = fn
        self.__signature__ = inspect.signature(fn)
        self.__module__ = getattr(fn, "__module__", None)
        self.__qualname__ = getattr(fn, "__qualname__", repr(fn))

    def __call__(self, prompts, responses, **fields):
        return [self.fn(prompts[0], responses[0], **{k: v[0] for k, v in fields.items()})]


# -- the worker side ---------------------------------------------------------------------------------------------
_WORKER_FN = None


def _worker_init(spec_or_fn) -> None:
    global _WORKER_FN
    if isinstance(spec_or_fn, str):
        from rlhf_engine.trainers.phases import load_reward_fn

        _WORKER_FN = load_reward_fn(spec_or_fn)
    else:
        _WORKER_FN = spec_or_fn
    torch.set_num_threads(1)


def _ready(_) -> None:
    time.sleep(0.05)  # long enough that the tasks spread over the workers


def _worker_score(prompts, responses, fields, on_error):
    return _score_chunk(_WORKER_FN, prompts, responses, fields, on_error)


class PendingScores:
    """Scores being computed; ``result()`` waits for them (at most ``timeout`` seconds per chunk)."""

    def __init__(self, scorer: RewardScorer, parts: list, n: int):
        self.scorer, self.parts, self.n = scorer, parts, n

    def result(self) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(scores [N] fp32, the number scored on_error, the batch mean of each logged extra)."""
        scores, errors, extras = [], 0, {}
        for async_result, size in self.parts:
            if isinstance(async_result, tuple):  # computed in this process
                chunk, chunk_errors, _, chunk_extras = async_result
            else:
                chunk, chunk_errors, chunk_extras = self.scorer._collect(async_result, size)
            scores += chunk
            errors += chunk_errors
            for key, values in chunk_extras.items():
                extras.setdefault(key, []).extend(values)
        means = {key: sum(values) / len(values) for key, values in extras.items()}
        return torch.tensor(scores, dtype=torch.float32), errors, means


class RewardScorer:
    """Runs a reward function on batches (see the module docstring). ``spec`` (``module:function``) lets workers
    import the function themselves; else ``fn`` is pickled to them."""

    def __init__(self, fn, *, spec: str | None = None, workers: int = 0, timeout: float | None = None,
                 on_error: float | None = None):
        if workers < 0:
            raise ValueError(f"reward_workers must be >= 0, found {workers}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"reward_timeout must be > 0 seconds, found {timeout}")
        if timeout is not None and workers == 0:
            raise ValueError("reward_timeout needs reward_workers >= 1: a call in this process cannot be stopped")
        self.fn, self.spec, self.workers, self.timeout, self.on_error = fn, spec, workers, timeout, on_error
        self.name = spec or _name(fn)
        self._pool = None
        self.last_error: str | None = None  # the text of the latest failure scored on_error

    def _get_pool(self):
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, initializer=_worker_init, initargs=(self.spec or self.fn,))
            # NOTE: a spawned worker takes seconds to start (it imports torch and the function): wait for them
            # here, so reward_timeout bounds the function's calls and not the start
            self._pool.map(_ready, range(self.workers), chunksize=1)
        return self._pool

    def submit(self, prompts: list[str], responses: list[str], fields: list[dict]) -> PendingScores:
        n = len(responses)
        if self.workers == 0:
            chunk = _score_chunk(self.fn, prompts, responses, fields, self.on_error)
            if chunk[2]:
                self.last_error = chunk[2]
            return PendingScores(self, [(chunk, n)], n)
        pool = self._get_pool()
        size = -(-n // self.workers)
        parts = []
        for start in range(0, n, size):
            stop = start + size
            parts.append((pool.apply_async(_worker_score, (prompts[start:stop], responses[start:stop],
                                                           fields[start:stop], self.on_error)), stop - start))
        return PendingScores(self, parts, n)

    def _collect(self, async_result, size: int) -> tuple[list[float], int, dict]:
        try:
            if self._pool is None and not async_result.ready():  # its pool was ended by an earlier timeout
                raise multiprocessing.TimeoutError
            chunk, errors, text, extras = async_result.get(self.timeout)
        except multiprocessing.TimeoutError:
            self.close()  # the stuck worker is killed with its pool; the next batch starts a new one
            if self.on_error is None:
                raise TimeoutError(f"reward_fn {self.name} did not return within reward_timeout = {self.timeout} s "
                                   f"for a chunk of {size} responses; raise reward_timeout or set reward_on_error"
                                   ) from None
            self.last_error = f"timeout after {self.timeout} s"
            return [self.on_error] * size, size, {}
        if text:
            self.last_error = text
        return chunk, errors, extras

    def close(self) -> None:
        """Ends the worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
