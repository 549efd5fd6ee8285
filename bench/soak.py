"""Soak test: steady Weaviate-style load on the real `vecshim serve`, watching the processes.

Starts `vecshim serve` on 127.0.0.1 (the bundled model, cache off, unless
`--config` says otherwise), then `--clients` keep-alive clients send distinct
texts to `POST /vectors` at a fixed total `--rate` for `--duration` seconds.
Every `--interval` seconds it samples, from /proc, the resident memory,
thread count and open file descriptors of the gunicorn master and its
workers. After `--warmup` seconds it fits a least-squares slope to each
series. The run passes when no request failed, no worker was replaced,
fds did not grow, RSS grew less than `--max-rss-growth-mb`, and threads stayed
within their configured maximum: the idle count at ready plus, per worker,
gunicorn's `--threads` pool. gthread grows its pool on demand (a slower machine,
with more requests in flight at once, gets more pool threads), so the count
after warm-up varies by machine; the pool's size never exceeds `--threads`.

Loopback only. Usage (the numbers in bench/RESULTS.md):
`flock /tmp/vecshim-bench.lock .venv/bin/python bench/soak.py --duration 600 --json /tmp/soak.json`
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["run_soak", "sample", "slope"]

VENV_BIN = Path(sys.executable).parent
WORDS = ("the of and a to in is was for on as with by at from his an were are which this be or had not but "
         "river bridge tower museum garden harbour lighthouse glacier violin orbit comet lantern meadow quartz "
         "saffron tundra walnut engine castle forest valley island market library station").split()
MAX_DURATION_S = 3600


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def sample(master: int) -> dict:
    """RSS (MB), threads and fds of the master and its workers, summed, plus the worker pids."""
    pids = [master, *_children(master)]
    rss = threads = fds = 0
    for pid in pids:
        try:
            st = _proc_status(pid)
            rss += st["VmRSS"]
            threads += st["Threads"]
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, KeyError):
            continue  # a worker exiting between listing and reading
    return {"t": time.monotonic(), "rss_mb": rss / 1024, "threads": threads, "fds": fds,
            "workers": sorted(pids[1:])}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def _text(rng: random.Random, i: int) -> str:
    return f"soak {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(4, 60)))


def _body(text: str, task: str) -> bytes:
    return json.dumps({"text": text, "dims": 0, "vector": None, "error": "",
                       "config": {"pooling_strategy": "masked_mean", "task_type": task}},
                      separators=(",", ":")).encode()


class _Load:
    """Clients sending at a fixed total rate; counts replies and keeps the first errors."""

    def __init__(self, port: int, clients: int, rate: float, seed: int):
        self.port, self.clients, self.rate = port, clients, rate
        self.ok = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counter = iter(range(10**12))
        self._rng = random.Random(seed)

    def _next(self) -> tuple[int, str]:
        with self._lock:
            i = next(self._counter)
            return i, _text(self._rng, i)

    def _client(self, k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        period = self.clients / self.rate
        due = time.monotonic() + k * period / self.clients
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            due += period
            i, text = self._next()
            start = time.monotonic()
            try:
                conn.request("POST", "/vectors", _body(text, ("query", "passage")[i % 2]),
                             {"User-Agent": "Go-http-client/1.1"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or not json.loads(data).get("vector"):
                    raise RuntimeError(f"status {resp.status}: {data[:200]!r}")
                with self._lock:
                    self.ok += 1
                    self.latencies.append(time.monotonic() - start)
            except Exception as err:  # counted; the run reports them
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                with self._lock:
                    self.error_count += 1
                    if len(self.errors) < 10:
                        self.errors.append(f"{type(err).__name__}: {err}")
        conn.close()

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.clients)]
        for t in threads:
            t.start()
        return threads

    def stop(self, threads) -> None:
        self._stop.set()
        for t in threads:
            t.join(70)


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vecshim serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/.well-known/ready")
            if conn.getresponse().status == 204:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("vecshim serve did not become ready")


def run_soak(*, duration: float, clients: int = 8, rate: float = 30.0, interval: float = 5.0,
             warmup: float = 60.0, config: dict | str | None = None, workers: int = 1,
             max_rss_growth_mb: float = 50.0, log_path: str | None = None, seed: int = 0,
             progress=None, threads: int = 64) -> dict:
    """Serve, load and sample for `duration` seconds; return the measurements and a verdict."""
    duration = min(duration, MAX_DURATION_S)
    with tempfile.TemporaryDirectory(prefix="vecshim-soak-") as tmp:
        if config is None or isinstance(config, dict):
            import yaml
            path = os.path.join(tmp, "soak.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(config or {"cache": {"enabled": False}}, f)
        else:
            path = config
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("VECSHIM_CONFIG", "PROMETHEUS_MULTIPROC_DIR")}
        env["HF_HUB_OFFLINE"] = "1"
        log = open(log_path or os.path.join(tmp, "server.log"), "wb")
        proc = subprocess.Popen([str(VENV_BIN / "vecshim"), "serve", "--config", path, "--bind",
                                 f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        load = _Load(port, clients, rate, seed)
        samples: list[dict] = []
        try:
            _wait_ready(port, proc, 180)
            time.sleep(0.5)  # the readiness probe's own thread has returned to the pool
            idle = sample(proc.pid)
            started = time.monotonic()
            client_threads = load.run()
            while time.monotonic() - started < duration:
                samples.append(sample(proc.pid))
                if progress:
                    progress(samples[-1], load)
                time.sleep(min(interval, max(0.0, duration - (time.monotonic() - started))))
            samples.append(sample(proc.pid))
            load.stop(client_threads)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
    limit = idle["threads"] + workers * threads
    return _verdict(samples, started, elapsed, warmup, load, max_rss_growth_mb, clients, rate, idle, limit)


def _verdict(samples, started, elapsed, warmup, load, max_rss_growth_mb, clients, rate, idle, limit) -> dict:
    steady = [s for s in samples if s["t"] - started >= warmup] or samples[-2:]
    per_min = {}
    for key in ("rss_mb", "threads", "fds"):
        per_min[key] = slope([((s["t"] - started) / 60, s[key]) for s in steady])
    first, last = steady[0], steady[-1]
    lat = sorted(load.latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None)
    worker_sets = {tuple(s["workers"]) for s in samples}
    result = {
        "duration_s": round(elapsed, 1), "clients": clients, "rate": rate, "warmup_s": warmup,
        "requests_ok": load.ok, "errors": load.error_count, "first_errors": load.errors,
        "throughput": round(load.ok / elapsed, 1) if elapsed else 0.0,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99),
        "samples": len(samples), "steady_samples": len(steady),
        "rss_mb": {"start": round(samples[0]["rss_mb"], 1), "steady_first": round(first["rss_mb"], 1),
                   "end": round(last["rss_mb"], 1), "max": round(max(s["rss_mb"] for s in steady), 1),
                   "slope_per_min": round(per_min["rss_mb"], 3)},
        "threads": {"idle": idle["threads"], "limit": limit, "steady_first": first["threads"],
                    "end": last["threads"], "series": [s["threads"] for s in samples],
                    "max": max(s["threads"] for s in steady), "slope_per_min": round(per_min["threads"], 3)},
        "fds": {"steady_first": first["fds"], "end": last["fds"], "max": max(s["fds"] for s in steady),
                "slope_per_min": round(per_min["fds"], 3)},
        "worker_restarts": len(worker_sets) - 1,
    }
    problems = []
    if load.error_count:
        problems.append(f"{load.error_count} failed requests")
    if result["worker_restarts"]:
        problems.append("a worker was replaced")
    if max(s["threads"] for s in samples) > limit:
        problems.append(f"threads reached {max(s['threads'] for s in samples)}, above the limit {limit} "
                        f"(idle {idle['threads']} + workers x threads)")
    if last["fds"] > first["fds"] + 4:
        problems.append(f"fds grew {first['fds']} -> {last['fds']}")
    if result["rss_mb"]["max"] - first["rss_mb"] > max_rss_growth_mb:
        problems.append(f"RSS grew {result['rss_mb']['max'] - first['rss_mb']:.1f} MB after warm-up")
    result["problems"] = problems
    result["ok"] = not problems
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load (max 3600)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rate", type=float, default=30.0, help="requests per second, all clients together")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between /proc samples")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slope fit")
    p.add_argument("--config", help="vecshim YAML (default: the bundled model, cache off)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=64, help="gunicorn threads per worker")
    p.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()

    def progress(s, load):
        if not args.quiet:
            print(f"rss {s['rss_mb']:7.1f} MB  threads {s['threads']:4d}  fds {s['fds']:4d}  "
                  f"ok {load.ok:7d}  errors {load.error_count}", file=sys.stderr, flush=True)

    result = run_soak(duration=args.duration, clients=args.clients, rate=args.rate, interval=args.interval,
                      warmup=args.warmup, config=args.config, workers=args.workers, threads=args.threads,
                      max_rss_growth_mb=args.max_rss_growth_mb, progress=progress)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
