"""Raw model throughput: the ceiling a server wrapping the same model can reach.

Encodes the bench corpus directly with sentence-transformers (no HTTP) and
reports texts/s per batch size, plus:

* ``batch_32_arrival``: chunks of 32 texts in corpus order, one ``encode``
  call each, i.e. what a micro-batcher that does not sort sees (each batch is
  padded to its own longest text);
* ``batch_32_sorted``: the whole corpus in one call with ``batch_size=32``;
  sentence-transformers sorts by length *within a call*, so padding is minimal;
* ``single``: latency of ``encode([text])`` one text at a time (the
  1-client comparison for ``loadgen --concurrency 1``).

Before each case the script waits (bounded) for the machine to be quiet and
records ``foreign_cpu_pct``, the CPU other processes used meanwhile.

Usage: ``python bench/raw_limit.py --threads 2 --n 1000 [--repeat 2] [--json]``
"""
from __future__ import annotations

import argparse
import json
import time

from benchlib import CpuMonitor, load_model, machine_info, percentile, wait_quiet
from corpus import get_corpus

__all__ = ["measure"]

WARMUP_TEXTS = 64


def _throughput(fn, n_texts: int, repeat: int = 1) -> dict:
    """Run ``fn`` ``repeat`` times on a quiet machine; keep the fastest run."""
    best = None
    for _ in range(repeat):
        busy_before = wait_quiet()
        with CpuMonitor() as mon:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        if best is None or seconds < best["seconds"]:
            best = {"texts_per_s": round(n_texts / seconds, 1), "seconds": round(seconds, 3),
                    "busy_before_pct": busy_before, "foreign_cpu_pct": mon.foreign_cpu_pct}
    return best


def _padding(model, texts: list[str], batch: int) -> dict:
    """Real vs padded tokens for arrival-order and length-sorted batches of ``batch``."""
    limit = model.max_seq_length
    lengths = [min(len(ids), limit) for ids in model.tokenizer(texts)["input_ids"]]

    def padded(seq: list[int]) -> int:
        return sum(max(seq[i:i + batch]) * len(seq[i:i + batch]) for i in range(0, len(seq), batch))

    real = sum(lengths)
    return {
        "real_tokens": real,
        "mean_tokens": round(real / len(lengths), 1),
        "arrival_padded_tokens": padded(lengths),
        "sorted_padded_tokens": padded(sorted(lengths)),
    }


def _single_latency(model, texts: list[str]) -> dict:
    """Per-call latency of encoding one text at a time."""
    times = []
    wait_quiet()
    with CpuMonitor() as mon:
        for text in texts:
            start = time.perf_counter()
            model.encode([text], batch_size=1, show_progress_bar=False)
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "foreign_cpu_pct": mon.foreign_cpu_pct,
        "n": len(times),
        "p50_ms": round(percentile(times, 50), 2),
        "p95_ms": round(percentile(times, 95), 2),
        "mean_ms": round(sum(times) / len(times), 2),
        "texts_per_s": round(1000 * len(times) / sum(times), 1),
    }


def measure(model, texts: list[str], batch_sizes=(1, 8, 32, 64), latency_n: int = 300,
            repeat: int = 1) -> dict:
    """Return all raw-limit measurements for ``texts`` on a loaded ``model``."""
    model.encode(texts[:WARMUP_TEXTS], batch_size=32, show_progress_bar=False)
    results: dict = {}
    for b in batch_sizes:
        results[f"batch_{b}"] = _throughput(
            lambda b=b: model.encode(texts, batch_size=b, show_progress_bar=False), len(texts), repeat)

    def arrival() -> None:
        for i in range(0, len(texts), 32):
            model.encode(texts[i:i + 32], batch_size=32, show_progress_bar=False)

    results["batch_32_arrival"] = _throughput(arrival, len(texts), repeat)
    results["batch_32_sorted"] = results.get("batch_32") or _throughput(
        lambda: model.encode(texts, batch_size=32, show_progress_bar=False), len(texts), repeat)
    results["single"] = _single_latency(model, texts[:latency_n])
    results["padding_b32"] = _padding(model, texts, 32)
    return results


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--n", type=int, default=1000, help="corpus size")
    parser.add_argument("--repeat", type=int, default=1, help="runs per throughput case; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--latency-n", type=int, default=300, help="texts for the single-text latency")
    parser.add_argument("--model", default=None, help="model path (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import torch

    model = load_model(args.model, args.threads)
    texts = get_corpus(args.n, args.seed)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    results = measure(model, texts, sizes, args.latency_n, args.repeat)
    report = {"threads": torch.get_num_threads(), "n": args.n, "seed": args.seed,
              "machine": machine_info(), "results": results}
    if args.json:
        print(json.dumps(report))
        return
    print(f"raw limit: n={args.n} threads={report['threads']} ({report['machine']['cpu']})")
    for key, value in results.items():
        if "texts_per_s" in value:
            print(f"  {key:<18} {value['texts_per_s']:>8.1f} texts/s   (other processes' CPU "
                  f"{value['foreign_cpu_pct']}%)")
    single = results["single"]
    print(f"  single-text latency p50 {single['p50_ms']} ms, p95 {single['p95_ms']} ms")
    pad = results["padding_b32"]
    print(f"  b32 padded tokens: arrival {pad['arrival_padded_tokens']}, sorted "
          f"{pad['sorted_padded_tokens']}, real {pad['real_tokens']}")


if __name__ == "__main__":
    main()
