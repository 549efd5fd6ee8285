"""Issue 18 benchmark: one engine per replica vs models in each worker, against raw ONNX in the same run.

In one run, on one machine, with the bundled all-MiniLM-L6-v2 on ONNX Runtime:

1. raw, through the backend's own ``embed`` (what the batcher calls), no HTTP:
   length-sorted chunks of 8, 16 and 32 texts with the served layout
   (``cpus`` encoder threads of one intra-op thread each), the best of which is
   the target's reference; and batch-1 latency with one encoder of ``cpus``
   intra-op threads ("all cores"), p50 over single texts;
2. per server layout (``--workers W --engine on|off``), real ``vecshim serve``:
   32 clients, unique texts, cache off; 1 client p50, cache off; 32 clients on
   a repeating pool with the default config (memory cache on, so hits); and the
   RSS and PSS of the whole process tree (master, workers, engine).

Clients (``--client``): ``wrk`` (default when installed, bench/wrkload.py) costs
the 2-core machine almost no CPU, so the server gets what a remote Weaviate
would leave it; ``loadgen`` runs several ``loadgen.py`` processes
(``--client-procs``), the byte-exact Go imitation that checks every vector,
whose own CPU use competes with the server's. The lone client sends the same
texts, in the same order, as the raw batch-1 latency measures, and every
32-client run without cache draws from the corpus the raw rate is taken on.

Run it alone: ``flock /tmp/vecshim-bench.lock .venv/bin/python bench/engine.py --json-out FILE``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import embed_chunks, emit_report, loadavg, machine_info, percentile, tree_memory, tree_pids
from corpus import get_corpus
from run_all import REPO, free_port, run_json, start_server, stop_server, wait_ready
from wrkload import available as wrk_available, run_wrk

LAYOUTS = ("1:off", "2:on", "4:on")
SEED_32 = 7     # corpus seed of the raw rate and of every 32-client cache-off run
SEED_1 = 4242   # corpus seed of the raw batch-1 latency and of every 1-client run


def _backend(concurrency: int, threads: int):
    from vecshim.backends.local import SentenceTransformersBackend as B

    backend = B(B.Options(runtime="onnx", threads=threads))
    backend.concurrency = concurrency
    backend.load()
    return backend


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw(texts: list[str], cpus: int, lone_texts: list[str]) -> dict:
    """Throughput of the served layout at several chunk sizes, and all-cores batch-1 latency."""
    out: dict = {}
    backend = _backend(cpus, 1)
    order = sorted(texts, key=lambda t: backend.count_tokens([t])[0])
    for size in (8, 16, 32):
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        backend.embed(chunks[0], "passage")

        def run() -> None:
            embed_chunks(backend, chunks, cpus)

        best = min(_timed(run) for _ in range(2))
        out[f"batch_{size}"] = {"texts_per_s": round(len(texts) / best, 1), "seconds": round(best, 3)}
    out["best_texts_per_s"] = max(v["texts_per_s"] for k, v in out.items() if k.startswith("batch_"))
    # What 32 clients allow at best: the texts in arrival order, 32 at a time (all a server
    # with 32 clients ever holds), each window cut into calls by the served planner.
    from vecshim.batchplan import plan_groups

    cap = min(16, backend.max_batch_size or 16)
    windows = [texts[i:i + 32] for i in range(0, len(texts), 32)]
    planned = [[w[j] for j in g] for w in windows
               for g in plan_groups(backend.count_tokens(w), max_size=cap, max_tokens=None, cost=backend.batch_cost)]
    best = min(_timed(lambda: embed_chunks(backend, planned, cpus)) for _ in range(2))
    out["windows_32_planned"] = {"texts_per_s": round(len(texts) / best, 1),
                                 "texts_per_call": round(len(texts) / len(planned), 2)}
    del backend
    lone = _backend(1, cpus)
    for t in texts[:20]:
        lone.embed([t], "passage")
    lat = []
    for t in lone_texts:
        start = time.perf_counter()
        lone.embed([t], "passage")
        lat.append((time.perf_counter() - start) * 1000)
    lat.sort()
    out["batch1_all_cores_p50_ms"] = round(percentile(lat, 50), 3)
    out["batch1_all_cores_p95_ms"] = round(percentile(lat, 95), 3)
    return out


def load(url: str, clients: int, procs: int, duration: float, corpus: str, seed: int, client: str = "wrk") -> dict:
    """`clients` over wrk, or spread over `procs` loadgen processes (rates summed, latencies of the first)."""
    if client == "wrk":
        return run_wrk(url, clients, duration, corpus=corpus, seed=seed)
    procs = max(1, min(procs, clients))
    per = [clients // procs + (i < clients % procs) for i in range(procs)]
    args = ["--url", url, "--duration", str(duration), "--corpus", corpus]
    with concurrent.futures.ThreadPoolExecutor(procs) as ex:
        futs = [ex.submit(run_json, "loadgen.py", *args, "--concurrency", str(n), "--seed", str(seed + i),
                          timeout=duration * 4 + 120) for i, n in enumerate(per)]
        reports = [f.result() for f in futs]
    return {"clients": clients, "client_procs": procs,
            "texts_per_s": round(sum(r["texts_per_s"] for r in reports), 1),
            "errors": sum(r["errors"] for r in reports),
            "p50_ms": reports[0]["p50_ms"], "p95_ms": reports[0]["p95_ms"],
            "client_cpu_s": round(sum(r["client_cpu_s"] for r in reports), 2)}


def served(layout: str, folder: Path, duration: float, procs: int, seed: int, client: str,
           options: dict | None = None) -> dict:
    workers, engine = layout.split(":")
    out: dict = {"workers": int(workers), "engine": engine}
    off = folder / "cache-off.json"
    model = {"backend": "sentence-transformers", **({"options": options} if options else {})}
    off.write_text(json.dumps({"models": {"minilm": model}, "cache": {"enabled": False}}))
    default = ""
    if options:  # the default config plus these backend options
        (folder / "default.json").write_text(json.dumps({"models": {"minilm": model}}))
        default = f"--config {folder / 'default.json'}"
    for phase, config in (("cache_off", f"--config {off}"), ("default", default)):
        port = free_port()
        cmd = (f"{REPO}/.venv/bin/vecshim serve --bind 127.0.0.1:{port} --workers {workers} "
               f"--engine {engine} {config}")
        proc = start_server(cmd, folder / f"{workers}-{engine}-{phase}.log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, 180)
            time.sleep(1.0)
            out[f"{phase}_loadavg_before"] = loadavg()
            if phase == "cache_off":
                before = tree_cpu(proc.pid)
                out["c32_miss"] = load(url, 32, procs, duration, "unique", SEED_32, client)
                miss = out["c32_miss"]
                texts = miss.get("requests") or round(miss["texts_per_s"] * duration)
                miss["cpu_ms_per_text"] = cpu_per_text(before, tree_cpu(proc.pid), texts)
                out["c1_miss"] = load(url, 1, 1, duration, "unique", SEED_1, client)
                out["memory_after_misses"] = tree_memory(proc.pid)
            else:
                load(url, 32, procs, 3, "repeat", seed + 200, client)  # fill the cache (every worker's)
                out["c32_hit"] = load(url, 32, procs, duration, "repeat", seed + 200, client)
                out["memory_default"] = tree_memory(proc.pid)
            out[f"{phase}_loadavg_after"] = loadavg()
        finally:
            stop_server(proc)
    return out


def tree_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each process of the tree: (role, seconds) by pid."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        role = "master" if p == pid else "engine" if b"vecshim.engine" in cmd else "workers"
        out[p] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_per_text(before: dict, after: dict, texts: int) -> dict:
    """Milliseconds of CPU per text, by role, between two tree_cpu() snapshots."""
    spent: dict[str, float] = {}
    for p, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(p, (role, 0.0))[1]
    return {role: round(1000 * s / max(texts, 1), 3) for role, s in sorted(spent.items())}


def markdown(report: dict) -> str:
    """The RESULTS.md tables for a report."""
    raw = report.get("raw", {})
    best = raw.get("best_texts_per_s")
    lat1 = raw.get("batch1_all_cores_p50_ms")
    lines = [f"raw, backend `embed()`, length-sorted, {report['cpus']} encoder threads x 1 intra-op thread: "
             + ", ".join(f"{k.replace('_', ' ')} {v['texts_per_s']} texts/s" for k, v in raw.items()
                         if k.startswith("batch_"))
             + f"; all-cores batch-1 latency p50 {lat1} ms (the lone client's texts)",
             f"client: {report.get('client', 'loadgen')}; backend options: {report.get('options') or 'defaults'}", "",
             "| layout | 32 clients, cache off | vs raw best | CPU ms/text (workers / engine / master) | "
             "1 client p50 (cache off) | vs raw batch-1 | 32 clients, cache hits | "
             "resident, each page once / RSS sum / PSS sum (default config, after hits) | processes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["layouts"].items():
        miss, one, hit, mem = r["c32_miss"], r["c1_miss"], r["c32_hit"], r["memory_default"]
        ratio = f"{miss['texts_per_s'] / best:.2f}x" if best else "-"
        delta = f"{one['p50_ms'] - lat1:+.2f} ms" if lat1 else "-"
        cpu = miss.get("cpu_ms_per_text", {})
        split = " / ".join(str(cpu.get(k, "-")) for k in ("workers", "engine", "master"))
        lines.append(f"| `--workers {r['workers']} --engine {r['engine']}` | {miss['texts_per_s']} "
                     f"({miss['errors']} errors) | {ratio} | {split} | {one['p50_ms']} ms | {delta} | "
                     f"{hit['texts_per_s']} ({hit['errors']} errors) | {mem.get('unique_mib', '-')} / "
                     f"{mem['rss_mib']} / {mem['pss_mib']} MiB | {mem['processes']} |")
    win = raw.get("windows_32_planned")
    if win and best:
        lines += ["", f"ceiling at 32 clients: the encoder alone, fed the texts 32 at a time in arrival order "
                      f"and cut by the served planner ({win['texts_per_call']} texts per call): "
                      f"{win['texts_per_s']} texts/s = {win['texts_per_s'] / best:.2f}x raw best"]
        for name, r in report["layouts"].items():
            workers = r["c32_miss"].get("cpu_ms_per_text", {}).get("workers")
            if workers and r["engine"] == "on":
                cap = report["cpus"] * 1000 / (report["cpus"] * 1000 / win["texts_per_s"] + workers)
                lines.append(f"- `{name}`: that encoder plus the HTTP workers' measured {workers} ms of CPU per "
                             f"text, with an engine costing nothing: at most {cap:.0f} texts/s = "
                             f"{cap / best:.2f}x raw best")
    layouts = report["layouts"]
    if "1:off" in layouts and "4:on" in layouts:
        one, four = layouts["1:off"]["memory_default"], layouts["4:on"]["memory_default"]
        if one.get("unique_mib") and four.get("unique_mib"):
            lines += ["", f"memory, 4 workers + engine vs 1 in-process worker: resident pages "
                          f"{four['unique_mib'] / one['unique_mib']:.2f}x, RSS sum {four['rss_mib'] / one['rss_mib']:.2f}x, "
                          f"PSS sum {four['pss_mib'] / one['pss_mib']:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="WORKERS:ENGINE,... (engine on|off)")
    p.add_argument("--client", choices=("wrk", "loadgen"), default="wrk" if wrk_available() else "loadgen")
    p.add_argument("--client-procs", type=int, default=4, help="loadgen processes for 32 clients")
    p.add_argument("--n", type=int, default=1000, help="raw corpus size")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--options", default=None, help="JSON backend options for every served config, e.g. "
                                                    "'{\"solo_spin\": true}'")
    p.add_argument("--json-out", default=None)
    p.add_argument("--markdown", default=None, help="print the tables of an earlier --json-out FILE and exit")
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cpus = len(os.sched_getaffinity(0))
    report: dict = {"machine": machine_info(), "loadavg_start": loadavg(), "cpus": cpus, "client": args.client,
                    "options": args.options, "layouts": {}}
    if not args.skip_raw:
        report["raw"] = raw(get_corpus(args.n, seed=SEED_32), cpus, get_corpus(1000, seed=SEED_1))
        print(json.dumps({"raw": report["raw"]}), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="vecshim-bench-engine-") as tmp:
        for i, layout in enumerate(args.layouts.split(",")):
            report["layouts"][layout] = served(layout, Path(tmp), args.duration, args.client_procs, 1000 * (i + 1),
                                               args.client, json.loads(args.options) if args.options else None)
            print(json.dumps({layout: report["layouts"][layout]}), file=sys.stderr, flush=True)
    report["loadavg_end"] = loadavg()
    emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
