"""Issue-5 benchmark: a rate-limited hosted API behind vecshim, micro-batched vs one text per call.

In one process: a fake OpenAI upstream (tests/fakes) answering after
``--latency-ms`` and allowing ``--rate-limit`` calls/s (429 with Retry-After
beyond), then for each configuration the real ``vecshim serve`` (gunicorn,
a subprocess in its own session) with an ``openai`` model pointing at the
fake, and ``loadgen.py``'s engine at ``--concurrency`` Weaviate-style
clients for ``--duration`` seconds:

* ``batched``: vecshim's micro-batcher (``--max-size``, ``--max-wait-ms``);
* ``baseline``: one text per upstream call, forwarded as it comes
  (batch max_size 1, one batch worker per client), same retry policy.

Reports texts/s, latency percentiles, client errors, upstream calls and
429s, upstream calls per text and the batched/baseline ratio. Loopback
only; every run is bounded; only the server processes started here are
stopped, by PID (and their own process group).

Usage::

    python bench/hosted.py                       # both configurations, 15 s each
    python bench/hosted.py --duration 15 --json  # one JSON report
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO / "tests"))  # after bench/: both hold a goclient.py

from fakes.openai_upstream import FakeOpenAI  # noqa: E402
from run_all import free_port, run_json, stop_server, wait_ready  # noqa: E402

KEY = "sk-bench-0123456789abcdef"
KEY_ENV = "VECSHIM_BENCH_OPENAI_KEY"


class CountingFake(FakeOpenAI):
    """FakeOpenAI with a snapshot of its counters."""

    def snapshot(self) -> dict:
        """Calls received so far, of which 429, and texts sent in accepted calls."""
        with self._lock:
            requests = list(self._requests)
            limited = self.limited
        return {"calls": len(requests), "limited": limited, "requests": requests,
                "texts_sent": sum(len(r.body.get("input", [])) for r in requests if isinstance(r.body, dict))}


def call_shape(requests: list, latency_s: float) -> dict:
    """Texts per upstream call (median, max) and the share of calls that began while
    another was still in flight (began less than the fake's latency after the previous one)."""
    sizes = sorted(len(r.body.get("input", [])) for r in requests if isinstance(r.body, dict))
    starts = sorted(r.at for r in requests)
    overlapping = sum(1 for a, b in zip(starts, starts[1:]) if b - a < latency_s)
    return {"texts_per_call_p50": sizes[len(sizes) // 2] if sizes else None,
            "texts_per_call_max": sizes[-1] if sizes else None,
            "calls_overlapping_share": round(overlapping / max(1, len(starts) - 1), 3)}


def model_config(fake: FakeOpenAI, args, *, batched: bool) -> dict:
    """The vecshim config of one run: defaults unless an option sets them; batching on or off."""
    retry = {k: v for k, v in (("max_attempts", args.max_attempts), ("budget_s", args.budget_s)) if v}
    if batched:
        batch = {k: v for k, v in (("max_size", args.max_size), ("workers", args.batch_workers)) if v}
        if args.max_wait_ms >= 0:
            batch["max_wait_ms"] = args.max_wait_ms
    else:
        # Forwarding: each request becomes its own call at once, as a plain proxy does.
        batch = {"max_size": 1, "max_wait_ms": 0, "workers": args.concurrency}
    model = {"backend": "openai",
             "options": {"model": "text-embedding-3-small", "base_url": fake.url + "/v1",
                         "api_key": "${%s}" % KEY_ENV, "dimensions": args.dim}}
    if batch:
        model["batch"] = batch
    if retry:
        model["retry"] = retry
    if batched and args.max_concurrency:
        model["max_concurrency"] = args.max_concurrency
    return {"models": {"hosted": model}, "cache": {"enabled": False},
            "logging": {"level": "WARNING"}}


def start_server(config: dict, workdir: Path, name: str, args) -> tuple[subprocess.Popen, str, Path]:
    """Write the config and start `vecshim serve` on a free loopback port."""
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log_path = workdir / f"{name}.log"
    cmd = [str(REPO / ".venv/bin/vecshim"), "serve", "--config", str(cfg_path),
           "--bind", f"127.0.0.1:{port}"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{KEY_ENV: KEY})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def load(url: str, args, *, seconds: float, requests: int | None, seed: int) -> dict:
    """Drive `url` with `--concurrency` Weaviate-style clients sending unique texts (no cache hits).

    `--client loadgen` (default): loadgen.py in its own process (its client
    threads then don't share the fake upstream's GIL), byte-faithful Go
    requests, every vector checked. `--client wrk`: wrk (bench/wrkload.py),
    which costs the 2-core machine almost no CPU, so the server gets it;
    replies are checked for status 200 and a vector field only.
    """
    if args.client == "wrk":
        from wrkload import run_wrk

        rep = run_wrk(url, args.concurrency, seconds if requests is None else min(seconds, 3.0),
                      corpus="unique", seed=seed, timeout_s=50)
        rep.update({"ok": round(rep["texts_per_s"] * rep["seconds"]),
                    "error_kinds": {"wrk_errors": rep["errors"]} if rep["errors"] else {},
                    "error_samples": []})
        return rep
    argv = ["--url", url, "--concurrency", str(args.concurrency), "--duration", str(seconds),
            "--warmup", "0", "--seed", str(seed), "--timeout", "50"]
    if requests:
        argv += ["--requests", str(requests)]
    return run_json("loadgen.py", *argv, timeout=seconds + 120)


def run_one(name: str, fake: CountingFake, args, workdir: Path, seed: int) -> dict:
    """Serve one configuration, warm it up, measure, and return the report.

    `ceiling` is `batched` against the same upstream without its rate limit:
    what this machine can push through at the moment, for the ratio.
    """
    config = model_config(fake, args, batched=name != "baseline")
    fake.rate_limit = None if name == "ceiling" else args.rate_limit
    proc, url, log_path = start_server(config, workdir, name, args)
    try:
        wait_ready(url, proc, 60)
        # Unmeasured warm-up (connections, gunicorn threads), then a quiet second so the
        # upstream's 1 s rate window starts empty.
        load(url, args, seconds=10, requests=2 * args.concurrency, seed=seed + 1000)
        time.sleep(1.1)
        before = fake.snapshot()
        report = load(url, args, seconds=args.duration, requests=None, seed=seed)
        after = fake.snapshot()
    finally:
        stop_server(proc)
    calls = after["calls"] - before["calls"]
    served = report["ok"] + report["errors"]
    report.update({
        "config": name, "server_log": str(log_path),
        "upstream_calls": calls, "upstream_429": after["limited"] - before["limited"],
        "upstream_calls_per_s": round(calls / report["seconds"], 1),
        "upstream_calls_per_text": round(calls / served, 4) if served else None,
        "texts_per_upstream_call": round(served / calls, 1) if calls else None,
        **call_shape(after["requests"][before["calls"]:], args.latency_ms / 1000),
        "batch": config["models"]["hosted"].get("batch", "defaults"),
        "retry": config["models"]["hosted"].get("retry", "defaults"),
    })
    return report


def versions() -> dict:
    """Machine and package facts for RESULTS.md."""
    import platform

    from importlib.metadata import version
    import gunicorn
    import openai

    from benchlib import _cpu_model

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO, timeout=5).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
            "openai": openai.__version__, "flask": version("flask"), "gunicorn": gunicorn.__version__,
            "git": commit, "argv": " ".join(shlex.quote(a) for a in sys.argv)}


def _print(result: dict) -> None:
    print(f"client: {result['client']}")
    for rep in result["runs"]:
        print(f"{rep['config']:9s} {rep['texts_per_s']:8.1f} texts/s  p50 {rep['p50_ms']} ms  "
              f"p95 {rep['p95_ms']} ms  p99 {rep['p99_ms']} ms  client errors {rep['errors']} "
              f"{rep['error_kinds'] or ''}")
        print(f"          upstream: {rep['upstream_calls']} calls ({rep['upstream_429']} answered 429), "
              f"{rep['upstream_calls_per_s']} calls/s, {rep['upstream_calls_per_text']} calls/text "
              f"({rep['texts_per_upstream_call']} texts/call, p50 {rep['texts_per_call_p50']}, "
              f"max {rep['texts_per_call_max']}, {rep['calls_overlapping_share']} of calls overlapping)")
        for sample in rep["error_samples"]:
            print(f"          error: {sample}")
    if "ratio" in result:
        print(f"ratio batched/baseline: {result['ratio']}x; batched vs the forwarding ceiling "
              f"({result['forwarding_ceiling']} texts/s): {result['ratio_vs_ceiling']}x")
    print("targets:", json.dumps(result.get("targets", {})))


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per configuration")
    p.add_argument("--concurrency", type=int, default=32, help="Weaviate-style clients")
    p.add_argument("--latency-ms", type=float, default=50.0, help="fake upstream latency per call")
    p.add_argument("--rate-limit", type=float, default=20.0, help="fake upstream calls/s before 429")
    p.add_argument("--dim", type=int, default=256, help="vector length the fake answers")
    p.add_argument("--max-size", type=int, default=0, help="batched: batch.max_size (0: default)")
    p.add_argument("--max-wait-ms", type=float, default=-1, help="batched: batch.max_wait_ms (<0: default)")
    p.add_argument("--batch-workers", type=int, default=0, help="batched: batch.workers (0: backend's)")
    p.add_argument("--max-concurrency", type=int, default=0, help="batched: max_concurrency (0: unset)")
    p.add_argument("--max-attempts", type=int, default=0, help="retry.max_attempts (both; 0: default)")
    p.add_argument("--budget-s", type=float, default=0, help="retry.budget_s (both; 0: default)")
    p.add_argument("--workers", type=int, default=0, help="gunicorn workers (0: vecshim serve's default)")
    p.add_argument("--retry-after", default="0.2", help="Retry-After of the fake's 429s ('': computed)")
    p.add_argument("--no-limit-headers", action="store_true", help="the fake sends no x-ratelimit-* headers")
    p.add_argument("--only", choices=("batched", "baseline", "ceiling"), action="append",
                   help="run only these configurations (repeatable)")
    p.add_argument("--client", choices=("loadgen", "wrk"), default="loadgen",
                   help="load generator: loadgen.py (Go-faithful, checks vectors) or wrk (lean, ~0 client CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()

    names = args.only or ["batched", "baseline"]
    result: dict = {"machine": versions(), "client": args.client, "runs": []}
    with CountingFake(dim=args.dim, api_key=KEY, latency_s=args.latency_ms / 1000,
                      rate_limit=args.rate_limit, retry_after=args.retry_after or None,
                      send_limits=not args.no_limit_headers) as fake, \
            tempfile.TemporaryDirectory(prefix="vecshim-bench-hosted-") as tmp:
        for i, name in enumerate(names):
            result["runs"].append(run_one(name, fake, args, Path(tmp), seed=100 + i))
            for rep in result["runs"]:
                log = Path(rep["server_log"])
                rep["server_log_tail"] = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    by = {r["config"]: r for r in result["runs"]}
    if "batched" in by and "ceiling" in by and by["ceiling"]["texts_per_s"]:
        result["ratio_vs_machine_ceiling"] = round(by["batched"]["texts_per_s"] / by["ceiling"]["texts_per_s"], 3)
    if "batched" in by and "baseline" in by:
        a, b = by["batched"], by["baseline"]
        ceiling = args.rate_limit  # one text per call can never beat the upstream's call rate
        result["ratio"] = round(a["texts_per_s"] / b["texts_per_s"], 1) if b["texts_per_s"] else None
        result["forwarding_ceiling"] = ceiling
        result["ratio_vs_ceiling"] = round(a["texts_per_s"] / ceiling, 1)
        result["targets"] = {
            "ratio_ge_16": bool(result["ratio"] and result["ratio"] >= 16),
            "zero_client_errors_batched": a["errors"] == 0,
            "calls_per_text_le_1_16": bool(a["upstream_calls_per_text"] is not None
                                           and a["upstream_calls_per_text"] <= 1 / 16),
        }
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)


if __name__ == "__main__":
    main()
