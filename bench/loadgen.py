"""Load generator that talks to a vectorizer exactly like Weaviate's Go client.

Each request is one text: ``POST {base}/vectors`` with no Content-Type, the
headers Go's net/http sends by default, and a compact, HTML-escaped Go-style
JSON body (``CONTRACTS.md`` §0, §1.4). ``--protocol openai`` sends
``POST /v1/embeddings`` ``{"input": [text], "model": ...}`` instead.

Traffic goes only to 127.0.0.1 / localhost / ::1; other hosts are refused.
Runs are bounded by ``--duration`` and/or ``--requests`` (whichever ends
first) and never exceed ``MAX_DURATION_S``.

Usage: ``python bench/loadgen.py --url http://127.0.0.1:8080 --concurrency 32 --duration 20``
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import threading
import time
from urllib.parse import urlsplit

from benchlib import percentile
from corpus import get_repeating, iter_corpus
from goclient import LOCAL_HOSTS, ConnectionPool, request_once

__all__ = ["run_load"]

MAX_DURATION_S = 600
FLOAT32_MAX = 3.4028234663852886e38


class TextSource:
    """Thread-safe endless supply of (index, text, task) triples."""

    def __init__(self, corpus: str, task: str, seed: int, distinct: int):
        if corpus == "repeat":
            pool = get_repeating(distinct, distinct, seed)
            self._texts = itertools.cycle(pool)
        else:
            self._texts = iter_corpus(seed)
        self._task = task
        self._index = itertools.count()
        self._lock = threading.Lock()

    def next(self) -> tuple[int, str, str]:
        """Return the next text and the task type to send it with."""
        with self._lock:
            i, text = next(self._index), next(self._texts)
        task = self._task if self._task != "mixed" else ("query", "passage")[i % 2]
        return i, text, task


def check_vector(vector) -> str | None:
    """Return why ``vector`` would break Weaviate's float32 decode, or None."""
    if not isinstance(vector, list) or not vector:
        return "vector missing or empty"
    for x in vector:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return f"non-number element {x!r}"
        if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
            return f"non-finite or out-of-float32 element {x!r}"
    return None


class Stats:
    """Results collected by all client threads."""

    def __init__(self, keep: int):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.dims: dict[int, int] = {}
        self.resends = 0
        self.keep = keep
        self.kept: list[tuple[str, str, list[float]]] = []
        self.last_done = 0.0

    def add_error(self, kind: str, detail: str) -> None:
        """Count one failed request."""
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if len(self.error_samples) < 5:
                self.error_samples.append(f"{kind}: {detail[:200]}")

    def add_ok(self, latency_ms: float, text: str, task: str, vector: list[float]) -> None:
        """Record one successful request."""
        with self.lock:
            self.latencies.append(latency_ms)
            self.dims[len(vector)] = self.dims.get(len(vector), 0) + 1
            if len(self.kept) < self.keep:
                self.kept.append((text, task, vector))
            self.last_done = time.perf_counter()


def _client(pool: ConnectionPool, source: TextSource, args, stats: Stats | None,
            stop: threading.Event, budget: itertools.count, limit: int | None) -> None:
    """One client thread: send requests back to back until told to stop."""
    while not stop.is_set():
        if limit is not None and next(budget) >= limit:
            return
        _, text, task = source.next()
        start = time.perf_counter()
        try:
            status, body, resends = request_once(pool, args.protocol, args.path, text, task, args.model_name)
        except Exception as exc:  # a benchmark counts every failure instead of dying
            if stats is not None:
                stats.add_error("transport", repr(exc))
            continue
        latency_ms = (time.perf_counter() - start) * 1000
        if stats is None:
            continue
        stats.resends += resends
        if status != 200:
            stats.add_error(f"status_{status}", body[:200].decode("utf-8", "replace"))
            continue
        try:
            payload = json.loads(body)
            vector = payload["data"][0]["embedding"] if args.protocol == "openai" else payload["vector"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            stats.add_error("bad_json", repr(exc))
            continue
        problem = check_vector(vector)
        if problem:
            stats.add_error("bad_vector", problem)
            continue
        stats.add_ok(latency_ms, text, task, vector)


def _phase(pool, source, args, stats, seconds: float, limit: int | None) -> float:
    """Run ``args.concurrency`` clients for ``seconds`` or ``limit`` requests; return elapsed."""
    stop = threading.Event()
    budget = itertools.count()
    threads = [threading.Thread(target=_client, args=(pool, source, args, stats, stop, budget, limit),
                                daemon=True) for _ in range(args.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    deadline = start + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    stop.set()
    # In-flight requests finish (bounded by the socket timeout) so none is cut off mid-read.
    for t in threads:
        t.join(args.timeout + 1)
    end = stats.last_done if stats is not None and stats.last_done else time.perf_counter()
    return max(end - start, 1e-9)


def verify(kept, model_path: str | None, threshold: float = 0.9999) -> dict:
    """Compare served vectors with a direct encode of the same texts (cosine)."""
    import numpy as np

    from benchlib import load_model

    model = load_model(model_path)
    texts = [t for t, _, _ in kept]
    direct = model.encode(texts, batch_size=32, show_progress_bar=False, convert_to_numpy=True)
    served = np.asarray([v for _, _, v in kept], dtype=np.float64)
    if served.shape[1] != direct.shape[1]:
        return {"n": len(kept), "ok": False, "reason": f"dims {served.shape[1]} != {direct.shape[1]}"}
    cos = (served * direct).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(direct, axis=1))
    bad = [texts[i][:60] for i in np.flatnonzero(cos < threshold)[:3]]
    return {"n": len(kept), "min_cosine": float(cos.min()), "below_threshold": int((cos < threshold).sum()),
            "ok": bool((cos >= threshold).all()), "examples_below": bad}


def run_load(args) -> dict:
    """Run warm-up and the measured phase; return the report dict."""
    parts = urlsplit(args.url)
    if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS:
        raise SystemExit(f"refusing {args.url!r}: only http:// to {', '.join(sorted(LOCAL_HOSTS))}")
    duration = min(args.duration, MAX_DURATION_S)
    base_path = parts.path.rstrip("/")
    args.path = base_path + (args.path or ("/v1/embeddings" if args.protocol == "openai" else "/vectors"))
    pool = ConnectionPool(parts.hostname, parts.port or 80, args.timeout,
                          max_idle=args.max_idle or args.concurrency, api_key=args.api_key)
    source = TextSource(args.corpus, args.task, args.seed, args.distinct)
    if args.warmup:
        _phase(pool, source, args, None, duration, args.warmup)
    stats = Stats(keep=args.verify)
    cpu0 = time.process_time()
    elapsed = _phase(pool, source, args, stats, duration, args.requests)
    client_cpu = time.process_time() - cpu0
    pool.close()
    lat = sorted(stats.latencies)
    ok = len(lat)
    report = {
        "url": args.url, "path": args.path, "protocol": args.protocol, "concurrency": args.concurrency,
        "corpus": args.corpus, "task": args.task, "max_idle": pool.max_idle,
        "ok": ok, "errors": sum(stats.errors.values()), "error_kinds": stats.errors,
        "error_samples": stats.error_samples, "resends": stats.resends,
        "seconds": round(elapsed, 3), "texts_per_s": round(ok / elapsed, 1),
        "p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2),
        "p99_ms": round(percentile(lat, 99), 2), "max_ms": round(lat[-1], 2) if lat else None,
        "dims": sorted(stats.dims), "dims_consistent": len(stats.dims) == 1,
        "connections_opened": pool.opened, "client_cpu_s": round(client_cpu, 2),
    }
    if args.verify and stats.kept:
        report["verify"] = verify(stats.kept, args.model)
    return report


def _print(report: dict) -> None:
    """Human-readable summary."""
    print(f"{report['protocol']} {report['path']} c={report['concurrency']} corpus={report['corpus']} "
          f"task={report['task']}")
    print(f"  {report['ok']} ok, {report['errors']} errors {report['error_kinds'] or ''} in "
          f"{report['seconds']} s -> {report['texts_per_s']} texts/s")
    print(f"  latency ms: p50 {report['p50_ms']}  p95 {report['p95_ms']}  p99 {report['p99_ms']}  "
          f"max {report['max_ms']}")
    print(f"  dims {report['dims']} consistent={report['dims_consistent']}  connections opened "
          f"{report['connections_opened']}  resends {report['resends']}  client CPU {report['client_cpu_s']} s")
    for sample in report["error_samples"]:
        print(f"  error: {sample}")
    if "verify" in report:
        print(f"  verify: {report['verify']}")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="service base URL (localhost only)")
    p.add_argument("--path", default=None, help="endpoint path (default /vectors, or /v1/embeddings)")
    p.add_argument("--protocol", choices=("weaviate", "openai"), default="weaviate")
    p.add_argument("--concurrency", type=int, default=1, help="client threads")
    p.add_argument("--duration", type=float, default=10.0, help="seconds (max %d)" % MAX_DURATION_S)
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured requests first")
    p.add_argument("--task", choices=("query", "passage", "mixed"), default="passage")
    p.add_argument("--corpus", choices=("unique", "repeat"), default="unique")
    p.add_argument("--distinct", type=int, default=200, help="pool size for --corpus repeat")
    p.add_argument("--seed", type=int, default=0, help="corpus seed; use a new one per cache-off run")
    p.add_argument("--max-idle", type=int, default=0,
                   help="idle keep-alive connections kept (default: concurrency; Go's default is 2)")
    p.add_argument("--timeout", type=float, default=50.0, help="per-request timeout (Weaviate: 50 s)")
    p.add_argument("--verify", type=int, default=0, help="compare N responses with a direct encode")
    p.add_argument("--model", default=None, help="model path for --verify (default: bundled MiniLM)")
    p.add_argument("--model-name", default="all-MiniLM-L6-v2", help="'model' field for --protocol openai")
    p.add_argument("--api-key", default="bench", help="bearer token for --protocol openai")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main() -> None:
    """CLI entry point."""
    args = build_parser().parse_args()
    if args.concurrency < 1:
        sys.exit("--concurrency must be >= 1")
    report = run_load(args)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    if report["errors"] or not report["dims_consistent"] or not report.get("verify", {"ok": True})["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
