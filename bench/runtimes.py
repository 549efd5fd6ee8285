"""Runtimes benchmark (issue 10): raw torch limit vs vecshim served on torch, onnx and onnx-int8.

In one run, on one machine:

1. raw torch: ``SentenceTransformer.encode(corpus, batch_size=32)`` (length-sorted
   within the call) with 2 torch threads -- the reference rate the targets use;
2. raw per runtime, through the backend's own ``embed`` (what the batcher calls):
   length-sorted chunks of 1, 4, 8, 16, 32 texts, with one encoder thread of
   ``cpus`` intra-op threads and with ``cpus`` encoder threads of one thread each;
3. served per runtime: ``vecshim serve --config`` (real gunicorn) with a config per
   runtime and a fresh ONNX cache; start-to-ready with export, then again once
   cached; ``loadgen.py`` at 32 clients and at 1 client (p50).

Run it alone: ``flock /tmp/vecshim-bench.lock .venv/bin/python bench/runtimes.py --json-out FILE``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchlib import embed_chunks, loadavg, machine_info, wait_quiet
from corpus import get_corpus
from raw_limit import _throughput
from run_all import REPO, free_port, run_json, start_server, stop_server, wait_ready

RUNTIMES = ("torch", "onnx", "onnx-int8")
SIZES = (1, 4, 8, 16, 32)


def raw_torch(texts: list[str], threads: int) -> dict:
    """sentence-transformers' own encode at batch 32, the rate the issue's targets refer to."""
    from benchlib import load_model

    model = load_model(None, threads)
    model.encode(texts[:64], batch_size=32, show_progress_bar=False)
    return {f"batch_{b}": _throughput(lambda b=b: model.encode(texts, batch_size=b, show_progress_bar=False),
                                      len(texts)) for b in (1, 8, 32)}


def raw_backend(runtime: str, texts: list[str], cache: str, workers: int, threads: int) -> dict:
    """texts/s of backend.embed over length-sorted chunks, `workers` threads in parallel."""
    from vecshim.backends.local import SentenceTransformersBackend as B

    backend = B(B.Options(runtime=runtime, onnx_cache_dir=cache, threads=threads))
    backend.concurrency = workers
    backend.load()
    order = sorted(texts, key=lambda t: backend.count_tokens([t])[0])
    out = {}
    for size in SIZES:
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        backend.embed(chunks[0], "passage")

        def run() -> None:
            embed_chunks(backend, chunks, workers)

        out[f"batch_{size}"] = _throughput(run, len(texts))
    return out


def write_config(folder: Path, runtime: str, cache: str, batch: dict) -> Path:
    """One-model config for `runtime` (JSON is valid YAML)."""
    cfg = {"models": {"minilm": {"backend": "sentence-transformers",
                                 "options": {"model": "bundled", "runtime": runtime, "onnx_cache_dir": cache},
                                 "batch": batch}},
           "cache": {"enabled": False}}
    path = folder / f"{runtime}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def served(runtime: str, folder: Path, cache: str, batch: dict, duration: float) -> dict:
    """Start-to-ready (export, then cached) and loadgen at 32 and 1 clients."""
    config = write_config(folder, runtime, cache, batch)
    result: dict = {"config": json.loads(config.read_text())}
    for phase in ("first_start", "cached_start"):
        port = free_port()
        cmd = f"{REPO}/.venv/bin/vecshim serve --bind 127.0.0.1:{port} --config {config}"
        proc = start_server(cmd, folder / f"{runtime}-{phase}.log")
        try:
            url = f"http://127.0.0.1:{port}"
            start = time.monotonic()
            wait_ready_fast(url, proc)
            result[f"{phase}_ready_s"] = round(time.monotonic() - start, 2)
            if phase == "first_start":
                continue
            import urllib.request
            with urllib.request.urlopen(url + "/meta", timeout=5) as r:
                meta = json.loads(r.read())
            m = meta.get("models", {}).get("minilm") or meta.get("model", {})
            result["meta"] = {k: m.get(k) for k in ("fingerprint", "model", "batch")}
            wait_quiet()
            result["loadavg_before"] = loadavg()
            common = ["--url", url, "--duration", str(duration)]
            result["c32"] = run_json("loadgen.py", *common, "--concurrency", "32", "--seed", "202",
                                     timeout=duration * 4 + 120)
            result["c1"] = run_json("loadgen.py", *common, "--concurrency", "1", "--seed", "201",
                                    timeout=duration * 4 + 120)
            result["loadavg_after"] = loadavg()
        finally:
            stop_server(proc)
    return result


def wait_ready_fast(url: str, proc, timeout: float = 180.0) -> None:
    """Like run_all.wait_ready but polling every 50 ms, so start-to-ready is measured finely."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/.well-known/ready", timeout=0.5) as r:
                if r.status == 204:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    wait_ready(url, proc, 1)


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="corpus size for the raw rates")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per loadgen run")
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--skip-raw-backend", action="store_true")
    p.add_argument("--batch", default=None, help='JSON batch config for every runtime, e.g. {"max_size": 32}')
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    runtimes = args.runtimes.split(",")
    cpus = len(os.sched_getaffinity(0))
    texts = get_corpus(args.n, 0)
    report: dict = {"machine": machine_info(), "loadavg_start": loadavg(), "n": args.n}
    with tempfile.TemporaryDirectory(prefix="vecshim-bench-rt-") as tmp:
        folder, cache = Path(tmp), str(Path(tmp) / "onnx-cache")
        wait_quiet()
        report["raw_torch"] = raw_torch(texts, cpus)
        print("raw torch", {k: v["texts_per_s"] for k, v in report["raw_torch"].items()}, file=sys.stderr)
        if not args.skip_raw_backend:
            report["raw_backend"] = {}
            for rt in runtimes:
                for workers, threads in ((1, cpus), (cpus, 1)):
                    key = f"{rt} {workers}x{threads}"
                    # A subprocess per case, so thread settings never leak between cases.
                    code = (f"import json,sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import runtimes as r; "
                            f"print(json.dumps(r.raw_backend({rt!r}, r.get_corpus({args.n}, 0), {cache!r}, "
                            f"{workers}, {threads})))")
                    out = __import__("subprocess").run([sys.executable, "-c", code], capture_output=True,
                                                       text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
                    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
                    report["raw_backend"][key] = json.loads(lines[-1]) if lines else {"error": out.stderr[-800:]}
                    print("raw", key, {k: v.get("texts_per_s") for k, v in report["raw_backend"][key].items()
                                       if isinstance(v, dict)}, file=sys.stderr)
        report["served"] = {}
        batch = json.loads(args.batch) if args.batch else {}
        for rt in runtimes:
            rt_cache = str(folder / f"cache-{rt}")  # fresh: the first start exports
            report["served"][rt] = served(rt, folder, rt_cache, batch, args.duration)
            s = report["served"][rt]
            print(f"served {rt}: ready {s['first_start_ready_s']} s (export) / {s['cached_start_ready_s']} s "
                  f"(cached); c32 {s['c32']['texts_per_s']} texts/s; c1 p50 {s['c1']['p50_ms']} ms",
                  file=sys.stderr)
    report["loadavg_end"] = loadavg()
    ref = report["raw_torch"]["batch_32"]["texts_per_s"]
    report["vs_raw_torch_b32"] = {rt: round(s["c32"]["texts_per_s"] / ref, 2) for rt, s in report["served"].items()}
    print(json.dumps(report["vs_raw_torch_b32"]), file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    print("$", " ".join(shlex.quote(a) for a in sys.argv), file=sys.stderr)
    main()
