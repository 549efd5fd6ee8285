"""A/B of two (or more) checkouts of vecshim: 32 clients, cache off, interleaved rounds.

Each checkout (its own `.venv`) serves the bundled model in one layout, all
servers up at once, and each round drives 32 wrk clients at each in turn. Per
run: texts/s, CPU per text by role, and from the server's `/metrics` the texts
per taken batch and per backend call. On a shared VM only such interleaved
rounds compare two versions fairly.

Run alone: ``flock /tmp/vecshim-bench.lock .venv/bin/python bench/ab_checkouts.py
--checkout main=/path/a --checkout lead=/path/b --layout 2:on --rounds 3``
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import urllib.request
from pathlib import Path

from engine import SEED_32, cpu_per_text, tree_cpu
from run_all import free_port, start_server, stop_server, wait_ready
from wrkload import run_wrk


def batch_metrics(url: str) -> tuple[float, float, float]:
    """(batches, texts, backend calls) so far, from /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()

    def get(name: str) -> float:
        m = re.search(rf'^{name}{{model="minilm"}} (\S+)', text, re.M)
        return float(m.group(1)) if m else 0.0

    return get("vecshim_batch_size_count"), get("vecshim_batch_size_sum"), get("vecshim_batch_workers_count")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", action="append", required=True, help="NAME=PATH (repeat)")
    p.add_argument("--layout", default="2:on", help="WORKERS:ENGINE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    args = p.parse_args()
    checkouts = dict(c.split("=", 1) for c in args.checkout)
    workers, engine = args.layout.split(":")
    rows: dict[str, list[dict]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="vecshim-ab-") as tmp:
        cfg = Path(tmp) / "cache-off.json"
        cfg.write_text(json.dumps({"models": {"minilm": {"backend": "sentence-transformers"}},
                                   "cache": {"enabled": False}}))
        servers = {}
        try:
            for name, repo in checkouts.items():
                port = free_port()
                proc = start_server(f"{repo}/.venv/bin/vecshim serve --bind 127.0.0.1:{port} --workers {workers} "
                                    f"--engine {engine} --config {cfg}", Path(tmp) / f"{name}.log")
                servers[name] = (proc, f"http://127.0.0.1:{port}")
                wait_ready(servers[name][1], proc, 180)
            time.sleep(1.0)
            for _ in range(args.rounds):
                for name, (proc, url) in servers.items():
                    m0, before = batch_metrics(url), tree_cpu(proc.pid)
                    r = run_wrk(url, 32, args.duration, corpus="unique", seed=SEED_32)
                    cpu = cpu_per_text(before, tree_cpu(proc.pid), r["requests"])
                    batches, texts, calls = (b - a for a, b in zip(m0, batch_metrics(url)))
                    rows[name].append({"texts_per_s": r["texts_per_s"], "errors": r["errors"], "cpu_ms_per_text": cpu,
                                       "texts_per_batch": round(texts / max(batches, 1), 2),
                                       "texts_per_call": round(texts / max(calls, 1), 2)})
                    print(name, json.dumps(rows[name][-1]), flush=True)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    print("| checkout | texts/s per round | texts per batch | texts per call | engine CPU ms/text |")
    print("|---|---:|---:|---:|---:|")
    for name, got in rows.items():
        print(f"| {name} | {' / '.join(str(g['texts_per_s']) for g in got)} | "
              f"{' / '.join(str(g['texts_per_batch']) for g in got)} | "
              f"{' / '.join(str(g['texts_per_call']) for g in got)} | "
              f"{' / '.join(str(g['cpu_ms_per_text'].get('engine', '-')) for g in got)} |")


if __name__ == "__main__":
    main()
