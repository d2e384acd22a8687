"""Shared benchmark plumbing: one subprocess per measurement, median times, peak memory over the inputs."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(forward, leaves, device: str, repeat: int, grad_out=None, warmup=None) -> dict:
    """Times ``forward()`` and forward+backward (``out.backward(grad_out)``): medians over ``repeat`` runs.

    Peak memory is that of one forward+backward over what already exists (the inputs): on CUDA the allocator's
    peak, on CPU the growth of the process's peak RSS (valid because this process does nothing else).
    ``warmup()``, when given, runs first: the same call on tiny inputs, so that the libraries and extensions it
    loads on first use are resident before the RSS is read, not counted as the op's memory (tiny, so that the
    allocator's heap and mmap threshold stay as they were).
    """
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def full():
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_out)
        sync()

    if warmup is not None:
        warmup()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        full()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        full()
        peak = peak_rss_bytes() - base
    fwd_times, full_times = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = forward()
        sync()
        fwd_times.append(time.perf_counter() - t0)
        del out
        t0 = time.perf_counter()
        full()
        full_times.append(time.perf_counter() - t0)
    fwd_ms = statistics.median(fwd_times) * 1e3
    full_ms = statistics.median(full_times) * 1e3
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "forward_ms": round(fwd_ms, 3),
        "backward_ms": round(full_ms - fwd_ms, 3),
        "full_ms": round(full_ms, 3),
        "peak_mib": round(max(peak, 0) / 2**20, 2),
    }


def run_worker(script: str, payload: list) -> dict:
    """Runs ``script --worker JSON`` in a fresh interpreter and returns the JSON row it prints last."""
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(payload)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {payload} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def relative_to_naive(rows: list[dict], key_fields, field: str) -> list[float]:
    """Each row's ``field`` as a multiple of that of the ``naive`` row with the same ``key_fields`` (nan without
    one, or where naive's is 0)."""
    base = {tuple(r[k] for k in key_fields): r for r in rows if r["provider"] == "naive"}
    out = []
    for r in rows:
        ref = base.get(tuple(r[k] for k in key_fields))
        out.append(r[field] / ref[field] if ref and ref[field] > 0 else float("nan"))
    return out


def print_table(
    rows: list[dict],
    key_fields: list[str],
    value_fields: list[tuple[str, str]],
    ratios: tuple[tuple[str, str], tuple[str, str]] = (("full_ms", "time x"), ("peak_mib", "mem x")),
) -> None:
    """One line a row; the two ``ratios`` columns (field, title) are relative to the ``naive`` row of the same key."""
    (t_field, t_title), (m_field, m_title) = ratios
    headers = key_fields + ["provider"] + [title for _, title in value_fields] + [t_title, m_title]
    table = []
    t_ratios, m_ratios = (relative_to_naive(rows, key_fields, field) for field in (t_field, m_field))
    for r, t_ratio, m_ratio in zip(rows, t_ratios, m_ratios, strict=True):
        cells = [str(r[k]) for k in key_fields] + [r["provider"]]
        cells += [f"{r[field]:.2f}" if isinstance(r[field], float) else str(r[field]) for field, _ in value_fields]
        table.append(cells + [f"{t_ratio:.2f}", f"{m_ratio:.3f}"])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


def write_json(path: str | None, rows: list[dict]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def parse_args(doc: str, argv, worker, *, device: bool = True, quick_help: str = "small shapes, a few seconds",
               add_options=None):
    """The options every benchmark takes (``add_options(parser)`` adds a script's own). In a ``--worker``
    subprocess it runs ``worker`` on the JSON payload, prints its row and returns None; otherwise it returns the
    parsed options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_options is not None:
        add_options(parser)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions per case (median)")
    if device:
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return None
    return args
