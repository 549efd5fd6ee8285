"""The encoder alone on texts as a 16- or 32-client server gets them, by planner setting.

Windows of 16 or 32 corpus texts in arrival order are cut into calls by the
served planner (`vecshim.batchplan.plan_groups`) with the backend's cost model,
its per-call cost scaled by 1-6, and a 16 or 32 cap; length-sorted chunks of 8
are the reference. The served layout runs them (2 encoder threads x 1 intra-op
thread). Every variant runs once per round, `--rounds` times, because the
machine's speed drifts between minutes; each variant is compared with the
reference of its own round. Informs the planner's defaults (bench/RESULTS.md
"Issue 18, sixth pass").

Run alone: ``flock /tmp/vecshim-bench.lock .venv/bin/python bench/planner_windows.py``
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import embed_chunks  # noqa: E402
from corpus import get_corpus  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vecshim.backends.local import SentenceTransformersBackend as B
    from vecshim.batchplan import plan_groups

    cpus = len(os.sched_getaffinity(0))
    texts = get_corpus(args.n, seed=7)
    backend = B(B.Options(runtime="onnx", threads=1))
    backend.concurrency = cpus
    backend.load()
    counts = backend.count_tokens(texts)
    order = [t for _, t in sorted(zip(counts, texts), key=lambda x: x[0])]
    a, b, c = backend.batch_cost
    variants = {"sorted chunks of 8": [order[i:i + 8] for i in range(0, len(order), 8)]}
    for window, cap in ((16, 16), (32, 16), (32, 32)):
        for scale in (1, 2, 3, 4, 6):
            variants[f"windows of {window}, cap {cap}, per-call cost x{scale}"] = [
                [texts[i + j] for j in g] for i in range(0, len(texts), window)
                for g in plan_groups(counts[i:i + window], max_size=cap, max_tokens=None, cost=(a * scale, b, c))]
    backend.embed(texts[:8], "passage")
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, chunks in variants.items():
            start = time.perf_counter()
            embed_chunks(backend, chunks, cpus)
            rates[name].append(len(texts) / (time.perf_counter() - start))
    ref = rates["sorted chunks of 8"]
    print("| variant | texts per call | texts/s per round | vs sorted chunks of 8, median |")
    print("|---|---:|---:|---:|")
    for name, got in rates.items():
        ratio = statistics.median(x / r for x, r in zip(got, ref))
        print(f"| {name} | {len(texts) / len(variants[name]):.2f} | {' / '.join(f'{x:.1f}' for x in got)} "
              f"| {ratio:.3f} |")


if __name__ == "__main__":
    main()
