"""Progress bars: tqdm on a terminal; on anything else (CI, a cluster's log file) a plain line at most every
``LINE_SECONDS`` seconds or ``LINE_FRACTION`` of the run, never a stream of carriage-return redraws.

    bar = progress_bar(total=300, desc="sft", enabled=True)
    bar.update(1); bar.set_postfix(loss="0.412"); bar.close()
"""

from __future__ import annotations

import sys
import time

LINE_SECONDS = 10.0
LINE_FRACTION = 0.10


class _Disabled:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress:
    """The tqdm calls the trainers use, written as one line per report: ``desc: n/total (pct%) | elapsed, rate |
    postfix``. A line comes when LINE_SECONDS have passed or LINE_FRACTION of the total was done since the last
    one, and at the end."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", file=None):
        self.total, self.n, self.desc = total, initial, desc
        self.file = file if file is not None else sys.stderr
        self.start = self.last_time = time.monotonic()
        self.initial = self.last_n = initial
        self.postfix = ""
        self.closed = False

    def set_postfix(self, ordered_dict=None, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = max(1, int(self.total * LINE_FRACTION)) if self.total else 1
        if now - self.last_time >= LINE_SECONDS or self.n - self.last_n >= step or self.n == self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f" | {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total}{pct} | {elapsed:.0f}s, {rate:.2f} it/s{tail}", file=self.file,
              flush=True)
        self.last_time, self.last_n = now, self.n

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._line(time.monotonic())
        self.closed = True


def progress_bar(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True, file=None):
    """A tqdm bar on a terminal, ``LineProgress`` elsewhere, nothing when not ``enabled``."""
    if not enabled:
        return _Disabled()
    file = file if file is not None else sys.stderr
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=file)
    return LineProgress(total, initial=initial, desc=desc, file=file)


def silence_library_bars() -> None:
    """Turns off transformers' own bars ("Loading weights", "Writing model shards"), as ``--no-progress`` asks."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
