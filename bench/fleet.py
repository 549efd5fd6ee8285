"""Issue-15 benchmark: several `vecshim serve` replicas sharing one upstream account through one Redis.

In one process: a fake OpenAI upstream (tests/fakes) answering after
``--latency-ms``, allowing ``--rate-limit`` calls/s and ``--tpm`` tokens
(words) per minute, 429 with ``Retry-After: 0.2`` beyond, and announcing its
limits in OpenAI's ``x-ratelimit-*`` headers; a real ``redis-server``; then
``--replicas`` real ``vecshim serve`` processes (each with its default
workers, 2 for a hosted model) whose config holds only the model, the key,
the base URL and ``budget: {redis_url, expected_replicas}``; and one
``loadgen.py`` per replica with ``--concurrency`` Weaviate-style clients each,
all at once for ``--duration`` seconds.

Reports texts/s, client errors, latency, upstream calls, 429s, calls per
text, texts and tokens per call, and the throughput the account allows at
the batch sizes reached: min(rate_limit x texts/call, tpm/60 / tokens/text).
``--replicas 1 --no-redis`` is the one-replica case. Loopback only; bounded;
only processes started here are stopped, by PID.

Usage::

    python bench/fleet.py                               # 3 replicas x 2 workers, 96 clients
    python bench/fleet.py --replicas 1 --no-redis --tpm 0 --concurrency 32
    python bench/fleet.py --rate-limit 3 --replicas 1 --no-redis --tpm 0   # a slow account
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO / "tests"))  # after bench/: both hold a goclient.py

from hosted import KEY, KEY_ENV, CountingFake, versions  # noqa: E402
from redisserver import RedisServer  # noqa: E402
from run_all import free_port, run_json, stop_server, wait_ready  # noqa: E402


def replica_config(fake, args, redis_url: str | None) -> dict:
    """What a team writes: backend, model, dimensions, key, base URL; plus the shared budget."""
    model = {"backend": "openai",
             "options": {"model": "text-embedding-3-small", "base_url": fake.url + "/v1",
                         "api_key": "${%s}" % KEY_ENV, "dimensions": args.dim}}
    config = {"models": {"hosted": model}, "cache": {"enabled": False}, "logging": {"level": "WARNING"}}
    if redis_url:
        config["budget"] = {"redis_url": redis_url, "expected_replicas": args.replicas}
    return config


def start_replica(config: dict, workdir: Path, i: int, args) -> tuple[subprocess.Popen, str, Path]:
    cfg_path = workdir / f"replica{i}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log_path = workdir / f"replica{i}.log"
    cmd = [str(REPO / ".venv/bin/vecshim"), "serve", "--config", str(cfg_path), "--bind", f"127.0.0.1:{port}"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{KEY_ENV: KEY})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each replica its own folder, as on its own pod
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def load_all(urls: list[str], args, *, seconds: float, requests: int | None, seed: int) -> list[dict]:
    """One loadgen.py per replica, all at once; return their reports."""
    reports: list[dict | None] = [None] * len(urls)

    def run(i: int, url: str) -> None:
        argv = ["--url", url, "--concurrency", str(args.concurrency), "--duration", str(seconds),
                "--warmup", "0", "--seed", str(seed + i), "--timeout", "50"]
        if requests:
            argv += ["--requests", str(requests)]
        reports[i] = run_json("loadgen.py", *argv, timeout=seconds + 180)
    threads = [threading.Thread(target=run, args=(i, u)) for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in reports if r is not None]


def snapshot(fake) -> dict:
    with fake._lock:
        requests = list(fake._requests)
        return {"calls": len(requests), "limited": fake.limited, "tokens": fake.tokens_accepted,
                "texts": sum(len(r.body.get("input", [])) for r in requests if isinstance(r.body, dict))}


def meta_budget(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/meta", timeout=5) as resp:
        return json.loads(resp.read())["model"].get("rate_budget", {})


def run(args) -> dict:
    result: dict = {"machine": versions(), "load_before": os.getloadavg()}
    redis = None if args.no_redis else RedisServer().start()
    procs = []
    try:
        with CountingFake(dim=args.dim, api_key=KEY, latency_s=args.latency_ms / 1000, rate_limit=args.rate_limit,
                          tokens_per_minute=args.tpm or None, retry_after=args.retry_after) as fake, \
                tempfile.TemporaryDirectory(prefix="vecshim-bench-fleet-") as tmp:
            config = replica_config(fake, args, redis.url if redis else None)
            for i in range(args.replicas):
                procs.append(start_replica(config, Path(tmp), i, args))
            urls = [url for _, url, _ in procs]
            for proc, url, _ in procs:
                wait_ready(url, proc, 90)
            load_all(urls, args, seconds=10, requests=2 * args.concurrency, seed=5000)  # warm-up
            time.sleep(1.5)
            before = snapshot(fake)
            reports = load_all(urls, args, seconds=args.duration, requests=None, seed=100)
            after = snapshot(fake)
            budgets = [meta_budget(u) for u in urls]
            tails = [p[2].read_text(errors="replace")[-1200:] for p in procs]
    finally:
        for proc, _, _ in procs:
            stop_server(proc)
        if redis:
            redis.stop()
    seconds = max(r["seconds"] for r in reports)
    ok = sum(r["ok"] for r in reports)
    errors = sum(r["errors"] for r in reports)
    calls = after["calls"] - before["calls"]
    texts = after["texts"] - before["texts"]
    tokens = after["tokens"] - before["tokens"]
    limited = after["limited"] - before["limited"]
    accepted = calls - limited
    texts_per_call = texts / calls if calls else 0
    tokens_per_text = tokens / (texts - 0) if texts else 0
    allowed = args.rate_limit * (texts / accepted if accepted else 0)
    if args.tpm and tokens_per_text:
        allowed = min(allowed, args.tpm / 60 / tokens_per_text)
    texts_per_s = ok / seconds if seconds else 0
    result.update({
        "replicas": args.replicas, "workers": args.workers or "default", "clients": args.concurrency * args.replicas,
        "redis": not args.no_redis, "upstream": {"latency_ms": args.latency_ms, "calls_per_s": args.rate_limit,
                                                  "tokens_per_minute": args.tpm or None},
        "seconds": round(seconds, 1), "texts_per_s": round(texts_per_s, 1), "ok": ok, "client_errors": errors,
        "error_kinds": [r["error_kinds"] for r in reports if r["errors"]],
        "error_samples": [s for r in reports for s in r["error_samples"]][:5],
        "p50_ms": max(r["p50_ms"] for r in reports), "p99_ms": max(r["p99_ms"] for r in reports),
        "max_ms": max(r["max_ms"] or 0 for r in reports),
        "upstream_calls": calls, "upstream_429": limited,
        "upstream_429_share": round(limited / calls, 4) if calls else None,
        "upstream_calls_per_s": round(calls / seconds, 1) if seconds else None,
        "upstream_calls_per_text": round(calls / ok, 4) if ok else None,
        "texts_per_call": round(texts_per_call, 1), "tokens_per_text": round(tokens_per_text, 1),
        "tokens_per_minute_used": round(tokens / seconds * 60) if seconds else None,
        "allowed_texts_per_s": round(allowed, 1),
        "ratio_vs_allowed": round(texts_per_s / allowed, 3) if allowed else None,
        "budgets": budgets, "server_log_tails": tails, "load_after": os.getloadavg(),
    })
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="gunicorn workers per replica (0: vecshim serve's default)")
    p.add_argument("--concurrency", type=int, default=32, help="Weaviate-style clients per replica")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--rate-limit", type=float, default=20.0, help="upstream calls/s before 429")
    p.add_argument("--tpm", type=int, default=150_000, help="upstream tokens (words) per minute (0: none)")
    p.add_argument("--retry-after", default="0.2", help="Retry-After of the fake's 429s")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--no-redis", action="store_true", help="no Redis: each replica keeps its own budget")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    for key in ("replicas", "workers", "clients", "redis", "upstream", "seconds", "texts_per_s", "client_errors",
                "error_kinds", "p50_ms", "p99_ms", "max_ms", "upstream_calls", "upstream_429", "upstream_429_share",
                "upstream_calls_per_s", "upstream_calls_per_text", "texts_per_call", "tokens_per_text",
                "tokens_per_minute_used", "allowed_texts_per_s", "ratio_vs_allowed", "load_before", "load_after"):
        print(f"{key:24s} {result[key]}")
    for sample in result["error_samples"]:
        print("error:", sample)
    print("budget (replica 0):", json.dumps(result["budgets"][0]))


if __name__ == "__main__":
    main()
