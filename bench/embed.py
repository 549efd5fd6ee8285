"""`vecshim embed` against the raw encode rate of the same runtime, measured in the same run.

raw: the backend of the model `vecshim embed` uses (same class, options and
runtime, built from the same config) embeds the length-sorted corpus through
its own `embed()` in chunks of 16 and 32 texts, with two thread layouts
(`cpus` encoder threads of one intra-op thread each, and one encoder thread of
`cpus` intra-op threads). The fastest of these is the reference.

Also per text of CPU time (process CPU seconds, all threads): on a machine
shared with other work, wall-clock rates swing with the neighbours' load,
while CPU seconds per text show whether `vecshim embed` spends more work per
text than the raw call does. The raw runs use every other corpus text (same
length distribution, half the time).

embed: the real `vecshim embed --stats -q --input CORPUS -o OUT` in a
subprocess. `--stats` reports the rate from the first input line to the last
output record (model already loaded); the whole-process rate (start, load,
embed, write, exit) is reported too.

Rounds alternate raw and embed so both see the same machine load; the result
is each round's ratio and their median. The output is checked: one float32
record per input line, in order.

    flock /tmp/vecshim-bench.lock .venv/bin/python bench/embed.py --lines 4000 --rounds 3 --json-out FILE
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import embed_chunks, loadavg, sorted_chunks
from corpus import get_corpus

VENV_BIN = Path(sys.executable).parent


def make_backend(config: str | None, workers: int):
    """A fresh, loaded backend exactly as the config's default model builds it."""
    from vecshim.app import create_app

    state = create_app(config, load=False).extensions["vecshim"]
    model = state.get_model(None)
    backend = model.backend
    backend.concurrency = workers
    backend.load()
    return backend, model.cfg


def raw_rate(backend, texts: list[str], size: int, workers: int) -> tuple[float, float]:
    """(texts/s, texts per CPU-second) of backend.embed over length-sorted chunks of `size`, `workers` threads."""
    chunks = sorted_chunks(backend, texts, size)
    backend.embed(chunks[0], "passage")  # warm
    start, cpu = time.perf_counter(), time.process_time()
    embed_chunks(backend, chunks, workers)
    return len(texts) / (time.perf_counter() - start), len(texts) / (time.process_time() - cpu)


def run_embed(config: str | None, corpus: Path, out: Path) -> dict:
    cmd = [str(VENV_BIN / "vecshim"), "embed", "--stats", "-q", "--input", str(corpus), "-o", str(out)]
    if config:
        cmd += ["--config", config]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"vecshim embed failed ({proc.returncode}): {proc.stderr[-2000:]}")
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"lines_per_s": stats["lines_per_s"], "seconds": stats["seconds"],
            "lines_per_cpu_s": round(stats["lines"] / stats["cpu_seconds"], 1),
            "whole_process_s": round(whole, 2), "whole_process_lines_per_s": round(stats["lines"] / whole, 1)}


def check_output(out: Path, texts: list[str]) -> dict:
    """One record per input line, in order, float32 numbers that round-trip."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(texts), (len(rows), len(texts))
    assert all(r["text"] == t for r, t in zip(rows, texts))
    vecs = np.asarray([r["vector"] for r in rows], dtype=np.float32)
    assert np.isfinite(vecs).all()
    return {"records": len(rows), "dimension": int(vecs.shape[1]), "bytes": out.stat().st_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=4000, help="corpus lines (bench/corpus.py, seed 0)")
    p.add_argument("--rounds", type=int, default=3, help="alternating raw / embed rounds")
    p.add_argument("--config", help="vecshim YAML (default: the bundled model, as `vecshim embed` runs it)")
    p.add_argument("--json-out", help="also write the result here")
    args = p.parse_args()
    from vecshim.cpus import available_cpus

    texts = [t.replace("\n", " ") for t in get_corpus(args.lines)]
    cpus = available_cpus()
    result = {"lines": len(texts), "cpus": cpus, "loadavg_start": loadavg(), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="vecshim-embed-bench-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("".join(t + "\n" for t in texts))
        out = Path(tmp) / "out.jsonl"
        layouts = {f"{cpus}x1": make_backend(args.config, cpus)[0], f"1x{cpus}": make_backend(args.config, 1)[0]}
        result["runtime"] = getattr(layouts[f"{cpus}x1"], "runtime", None)
        sample = texts[::2]  # raw runs on every other text: the same distribution, half the time
        for r in range(args.rounds):
            raw, raw_cpu = {}, {}
            for name, backend in layouts.items():
                workers = int(name.split("x")[0])
                for size in (16, 32):
                    rate, per_cpu = raw_rate(backend, sample, size, workers)
                    raw[f"{name}_batch{size}"], raw_cpu[f"{name}_batch{size}"] = round(rate, 1), round(per_cpu, 1)
            best = max(raw, key=raw.get)
            emb = run_embed(args.config, corpus, out)
            if r == 0:
                result["output"] = check_output(out, texts)
            row = {"raw": raw, "raw_per_cpu_s": raw_cpu, "raw_best": best, "embed": emb, "loadavg": loadavg(),
                   "ratio": round(emb["lines_per_s"] / raw[best], 3),
                   "ratio_whole_process": round(emb["whole_process_lines_per_s"] / raw[best], 3),
                   "cpu_efficiency_ratio": round(emb["lines_per_cpu_s"] / max(raw_cpu.values()), 3)}
            result["rounds"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result["median_ratio"] = statistics.median(r["ratio"] for r in result["rounds"])
    result["median_ratio_whole_process"] = statistics.median(r["ratio_whole_process"] for r in result["rounds"])
    result["median_cpu_efficiency_ratio"] = statistics.median(r["cpu_efficiency_ratio"] for r in result["rounds"])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
