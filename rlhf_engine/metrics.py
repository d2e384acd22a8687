"""Per-step metrics: one JSON object a line in ``<output_dir>/metrics.jsonl`` (TensorBoard too when asked), plus
the summary table and the PNG of the curves that every phase prints and writes at the end.

On resume the file is cut back to the rows before the resumed step, so a resumed run's file is the same as an
uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Appends rows to ``path``; with ``resume_step`` first drops the rows whose ``step`` is at or past it."""

    def __init__(self, path: str, *, resume_step: int | None = None, tensorboard_dir: str | None = None,
                 enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.rows: list[dict] = []
        self._tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None:
            self.rows = [r for r in read_metrics(path) if r.get("step", -1) < resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
        else:
            open(path, "w").close()
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from err
            self._tb = SummaryWriter(tensorboard_dir)

    def log(self, row: dict) -> None:
        row = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            step = row.get("step", len(self.rows))
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    line = "=" * (width + value_width + 2)
    return "\n".join([line, *(f"{k:<{width}}  {v:>{value_width}}" for k, v in rows), line])


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_curves(rows: list[dict], keys: list[str], path: str, *, x: str = "step", title: str = "") -> str | None:
    """One panel per key present in ``rows`` (against ``x``); returns the PNG path, or None with nothing to draw."""
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r[x], r[key]) for r in rows if key in r and x in r]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set(title=key, xlabel=x)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
