"""Progress output: tqdm on a terminal, at most a line per 10 s or 10% elsewhere (a batch job's log)."""

import io

from rlhf_engine import progress
from rlhf_engine.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_one_line_per_tenth():
    out = io.StringIO()
    bar = progress_bar(300, desc="sft", file=out)
    assert isinstance(bar, LineProgress)
    for step in range(300):
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (step + 1):.3f}")
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10
    assert lines[0].startswith("sft: 30/300 (10%)") and lines[-1].startswith("sft: 300/300 (100%)")
    assert "loss=0.003" in lines[-1]


def test_a_line_every_ten_seconds_between_tenths(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = LineProgress(1000, initial=200, desc="grpo", file=out)
    for _ in range(50):  # 5% of the run, 4 s a step: a line every 10 s
        clock[0] += 4.0
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 16  # every third step (12 s >= 10 s), none for the 10% rule
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("grpo: 250/1000 (25%)")


def test_terminal_gets_tqdm_and_disabled_prints_nothing():
    from tqdm.auto import tqdm

    bar = progress_bar(5, desc="x", file=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    out = io.StringIO()
    quiet = progress_bar(5, enabled=False, file=out)
    quiet.update(5)
    quiet.close()
    assert out.getvalue() == ""
