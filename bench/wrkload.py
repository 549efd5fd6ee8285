"""A lean load generator for server-capacity runs: `wrk` (C) driven by bench/wrk_vectors.lua.

On a 2-core machine the Python load generator (loadgen.py) takes a large share
of the CPU it is measuring; wrk costs a small fraction of that, so the server
gets nearly the whole machine, as it does when Weaviate (Go) runs elsewhere.
Requests are what Weaviate's Go client sends for `/vectors` (one text, no
Content-Type; loadgen.py keeps the byte-exact Go imitation and checks every
vector); here each reply is checked for status 200 and a `"vector":[` field.

Traffic goes only to 127.0.0.1. `wrk` comes from Debian's `wrk` package.

Usage: ``python bench/wrkload.py --url http://127.0.0.1:8080 --clients 32 --duration 10 --corpus unique``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from corpus import get_corpus, get_repeating
from goclient import LOCAL_HOSTS, openai_body, weaviate_body

__all__ = ["available", "run_wrk", "write_bodies"]

SCRIPT = Path(__file__).with_name("wrk_vectors.lua")
MAX_DURATION_S = 600


def available() -> bool:
    """Whether the `wrk` binary is installed."""
    return shutil.which("wrk") is not None


def write_bodies(path: Path, corpus: str, n: int, seed: int, protocol: str = "weaviate",
                 model: str = "text-embedding-3-small") -> None:
    """One request body per line: `n` unique texts, or a repeating pool of 200."""
    texts = get_corpus(n, seed) if corpus == "unique" else get_repeating(n, 200, seed)
    with open(path, "wb") as f:
        for t in texts:
            f.write((weaviate_body(t, "passage") if protocol == "weaviate" else openai_body(t, model)) + b"\n")


def run_wrk(url: str, clients: int, duration: float, *, corpus: str = "unique", seed: int = 0,
            threads: int | None = None, protocol: str = "weaviate", bodies: int | None = None,
            timeout_s: float = 30.0) -> dict:
    """Run wrk against `url` and return a report shaped like loadgen.py's."""
    host = urlsplit(url).hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"refusing to send load to {host!r}: only 127.0.0.1/localhost/::1")
    duration = min(duration, MAX_DURATION_S)
    threads = max(1, min(threads or (1 if clients == 1 else 2), clients))
    # Enough distinct bodies that a unique run never wraps: a generous bound on 2-core rates.
    n = bodies or int(max(2000, 1500 * duration))
    with tempfile.TemporaryDirectory(prefix="vecshim-wrk-") as tmp:
        path = Path(tmp) / "bodies.txt"
        write_bodies(path, corpus, n, seed, protocol)
        env = dict(os.environ, VECSHIM_WRK_BODIES=str(path), VECSHIM_WRK_THREADS=str(threads),
                   VECSHIM_WRK_PATH="/vectors" if protocol == "weaviate" else "/v1/embeddings")
        cmd = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{duration:g}s", f"--timeout={timeout_s:g}s",
               "-s", str(SCRIPT), url]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1000:]} {out.stderr[-1000:]}")
    r = json.loads(line[len("WRKJSON "):])
    seconds = r["duration_us"] / 1e6
    errors = r["bad"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return {"tool": "wrk", "clients": clients, "threads": threads, "requests": r["requests"],
            "seconds": round(seconds, 3), "texts_per_s": round((r["requests"] - r["bad"]) / seconds, 1),
            "errors": errors, "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "p99_ms": r["p99_ms"],
            "client_cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--corpus", choices=("unique", "repeat"), default="unique")
    p.add_argument("--protocol", choices=("weaviate", "openai"), default="weaviate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    args = p.parse_args()
    report = run_wrk(args.url, args.clients, args.duration, corpus=args.corpus, seed=args.seed,
                     threads=args.threads, protocol=args.protocol)
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
