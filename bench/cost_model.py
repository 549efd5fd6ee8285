"""Encode time of one batch as a function of batch size n and padded length L.

For every (n, L) in the grid, ``n`` distinct texts that tokenize to exactly
``L`` tokens (incl. [CLS]/[SEP]) are encoded in one ``encode`` call; the
grid is swept several times and each cell keeps its fastest time. Then

    cost(n, L) = a + b*n*L + c*n*L**2            (seconds)

is fitted by least squares on *relative* error (small batches matter as much
as big ones to a micro-batcher), together with the simpler ``a + b*n*L``.
The result goes to ``bench/cost_model.json`` with ``--write``.

Usage: ``python bench/cost_model.py --threads 2 --threads 1 [--write] [--json]``
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchlib import CpuMonitor, load_model, machine_info, wait_quiet
from corpus import get_corpus

__all__ = ["texts_of_length", "measure_grid", "fit"]

NS = (1, 4, 8, 16, 32)
LS = (16, 32, 64, 128, 256)
OUT = Path(__file__).resolve().parent / "cost_model.json"


def texts_of_length(tokenizer, length: int, count: int) -> list[str]:
    """Return ``count`` distinct texts that tokenize to exactly ``length`` tokens."""
    stream = tokenizer(" ".join(get_corpus(3000, seed=42)), add_special_tokens=False)["input_ids"]
    body, out, start = length - 2, [], 0
    while len(out) < count:
        text = tokenizer.decode(stream[start:start + body])
        # A window may cut a word in half; keep only windows that round-trip.
        if len(tokenizer(text)["input_ids"]) == length and text not in out:
            out.append(text)
        start += body + 1
    return out


def _time_batch(model, texts: list[str], min_reps: int = 2, max_reps: int = 10,
                min_seconds: float = 0.1) -> list[float]:
    """Seconds of several ``encode(texts)`` calls, each one batch."""
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < min_seconds and len(times) < max_reps):
        start = time.perf_counter()
        model.encode(texts, batch_size=len(texts), show_progress_bar=False)
        times.append(time.perf_counter() - start)
    return times


def measure_grid(model, ns=NS, ls=LS, passes: int = 3) -> tuple[list[tuple[int, int, float]], list[float]]:
    """Return (n, L, seconds) per grid cell and other processes' CPU % per pass.

    The grid is swept ``passes`` times and each cell keeps its *minimum*: on a
    shared machine noise only ever adds time, and sweeping repeatedly spreads
    a burst of foreign load over many cells instead of ruining one.
    """
    pools = {length: texts_of_length(model.tokenizer, length, max(ns)) for length in ls}
    for length in ls:  # first use of each shape is slower; keep it out of the timings
        for n in ns:
            model.encode(pools[length][:n], batch_size=n, show_progress_bar=False)
    samples: dict[tuple[int, int], list[float]] = {(n, length): [] for length in ls for n in ns}
    foreign = []
    for _ in range(passes):
        wait_quiet(max_wait=30)
        with CpuMonitor() as mon:
            for (n, length), times in samples.items():
                times.extend(_time_batch(model, pools[length][:n]))
        foreign.append(mon.foreign_cpu_pct)
    return [(n, length, min(times)) for (n, length), times in samples.items()], foreign


def fit(grid: list[tuple[int, int, float]], quadratic: bool = True) -> dict:
    """Fit cost(n, L) by least squares on relative error; return coefficients and errors."""
    n = np.array([g[0] for g in grid], dtype=float)
    length = np.array([g[1] for g in grid], dtype=float)
    t = np.array([g[2] for g in grid])
    columns = [np.ones_like(n), n * length] + ([n * length ** 2] if quadratic else [])
    design = np.stack(columns, axis=1) / t[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    pred = (np.stack(columns, axis=1) * coef).sum(1)
    rel = np.abs(pred - t) / t
    names = ["a", "b", "c"][:len(coef)]
    return {**{k: float(v) for k, v in zip(names, coef)},
            "mean_rel_err": round(float(rel.mean()), 4), "max_rel_err": round(float(rel.max()), 4)}


def run(threads: int) -> dict:
    """Measure and fit for one torch thread count."""
    import torch

    torch.set_num_threads(threads)
    model = load_model()
    start = time.perf_counter()
    grid, foreign = measure_grid(model)
    return {"threads": threads, "measure_seconds": round(time.perf_counter() - start, 1),
            "foreign_cpu_pct_per_pass": foreign,
            "fit": fit(grid), "fit_linear": fit(grid, quadratic=False),
            "grid": [{"n": n, "L": length, "ms": round(s * 1000, 3), "tokens_per_s": round(n * length / s)}
                     for n, length, s in grid]}


def _table(result: dict) -> str:
    """Markdown table of measured ms, rows L, columns n."""
    cells = {(g["n"], g["L"]): g["ms"] for g in result["grid"]}
    lines = ["| L \\ n | " + " | ".join(str(n) for n in NS) + " |", "|---|" + "---:|" * len(NS)]
    for length in LS:
        lines.append(f"| {length} | " + " | ".join(f"{cells[(n, length)]:.1f}" for n in NS) + " |")
    return "\n".join(lines)


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="torch threads (repeatable; default 2)")
    parser.add_argument("--write", action="store_true", help=f"write {OUT.name}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [run(t) for t in (args.threads or [2])]
    report = {"formula": "seconds = a + b*n*L + c*n*L**2 (n texts, L padded tokens incl. [CLS]/[SEP])",
              "fit_method": "least squares on relative error over the n x L grid",
              "model": "all-MiniLM-L6-v2 (bundled), sentence-transformers encode(), CPU",
              "machine": machine_info(), "results": {str(r["threads"]): r for r in results}}
    if args.write:
        OUT.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
        return
    for r in results:
        f, lin = r["fit"], r["fit_linear"]
        print(f"threads={r['threads']}  ({r['measure_seconds']} s, other processes' CPU per pass "
              f"{r['foreign_cpu_pct_per_pass']}%)  encode ms per batch:")
        print(_table(r))
        print(f"  fit: a={f['a'] * 1e3:.3f} ms  b={f['b'] * 1e6:.4f} us/token  c={f['c'] * 1e9:.4f} ns/token^2  "
              f"(mean rel err {f['mean_rel_err']:.1%}, max {f['max_rel_err']:.1%})")
        print(f"  linear: a={lin['a'] * 1e3:.3f} ms  b={lin['b'] * 1e6:.4f} us/token  "
              f"(mean rel err {lin['mean_rel_err']:.1%}, max {lin['max_rel_err']:.1%})")


if __name__ == "__main__":
    main()
