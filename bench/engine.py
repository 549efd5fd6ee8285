"""Issue 18 benchmark: one engine per replica vs models in each worker, against raw ONNX in the same run.

In one run, on one machine, with the bundled all-MiniLM-L6-v2 on ONNX Runtime,
``--rounds`` times in turn (the cache-off servers of every layout stay up and
idle while the others run), because on a shared VM the encoder's own speed
drifts by 10-25% between minutes and a served rate compares fairly only with
the raw rate measured next to it:

1. raw, through the backend's own ``embed`` (what the batcher calls), no HTTP:
   length-sorted chunks of 8, 16 and 32 texts with the served layout
   (``cpus`` encoder threads of one intra-op thread each), the best of which is
   the round's reference; the same texts in arrival order, 32 at a time, cut by
   the served planner (the best a 32-client server can feed the encoder); and
   batch-1 latency with one encoder of ``cpus`` intra-op threads ("all cores"),
   p50 over single texts;
2. per server layout (``--workers W --engine on|off``), real ``vecshim serve``,
   cache off: 32 clients on unique texts, with the CPU each role spent per
   text, then 1 client.

Each layout's targets are judged on the median of its rounds' ratios (min and
max are reported). Then, once per layout, the default config (memory cache on)
serves 32 clients on a repeating pool (hits), and the RSS and PSS of the whole
process tree (master, workers, engine) are read.

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
import statistics
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


def raw_backends(cpus: int):
    """The served layout (`cpus` encoder threads of one intra-op thread) and one all-cores encoder."""
    return _backend(cpus, 1), _backend(1, cpus)


def raw(backend, lone, texts: list[str], cpus: int, lone_texts: list[str]) -> dict:
    """Throughput of the served layout at several chunk sizes, and all-cores batch-1 latency."""
    out: dict = {}
    order = sorted(texts, key=lambda t: backend.count_tokens([t])[0])
    for size in (8, 16, 32):
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        backend.embed(chunks[0], "passage")
        best = _timed(lambda: embed_chunks(backend, chunks, cpus))
        out[f"batch_{size}"] = {"texts_per_s": round(len(texts) / best, 1), "seconds": round(best, 3)}
    out["best_texts_per_s"] = max(v["texts_per_s"] for k, v in out.items() if k.startswith("batch_"))
    # What 32 clients allow at best: the texts in arrival order, 32 at a time (all a server
    # with 32 clients ever holds), each window cut into calls by the served planner.
    from vecshim.batchplan import plan_groups

    cap = min(16, backend.max_batch_size or 16)
    windows = [texts[i:i + 32] for i in range(0, len(texts), 32)]
    planned = [[w[j] for j in g] for w in windows
               for g in plan_groups(backend.count_tokens(w), max_size=cap, max_tokens=None, cost=backend.batch_cost)]
    best = _timed(lambda: embed_chunks(backend, planned, cpus))
    out["windows_32_planned"] = {"texts_per_s": round(len(texts) / best, 1),
                                 "texts_per_call": round(len(texts) / len(planned), 2)}
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


def _write_configs(folder: Path, options: dict | None) -> tuple[str, str]:
    """The `--config` arguments of the cache-off phase and of the default phase."""
    off = folder / "cache-off.json"
    model = {"backend": "sentence-transformers", **({"options": options} if options else {})}
    off.write_text(json.dumps({"models": {"minilm": model}, "cache": {"enabled": False}}))
    default = ""
    if options:  # the default config plus these backend options
        (folder / "default.json").write_text(json.dumps({"models": {"minilm": model}}))
        default = f"--config {folder / 'default.json'}"
    return f"--config {off}", default


def start_layout(layout: str, folder: Path, phase: str, config: str):
    """A real `vecshim serve` in this layout; (process, url) once it is ready."""
    workers, engine = layout.split(":")
    port = free_port()
    cmd = (f"{REPO}/.venv/bin/vecshim serve --bind 127.0.0.1:{port} --workers {workers} "
           f"--engine {engine} {config}")
    proc = start_server(cmd, folder / f"{workers}-{engine}-{phase}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 180)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def misses(proc, url: str, duration: float, procs: int, client: str) -> dict:
    """32 clients on unique texts (with CPU per text by role), then one client, cache off."""
    out = {"loadavg_before": loadavg()}
    before = tree_cpu(proc.pid)
    out["c32_miss"] = load(url, 32, procs, duration, "unique", SEED_32, client)
    miss = out["c32_miss"]
    texts = miss.get("requests") or round(miss["texts_per_s"] * duration)
    miss["cpu_ms_per_text"] = cpu_per_text(before, tree_cpu(proc.pid), texts)
    out["c1_miss"] = load(url, 1, 1, duration, "unique", SEED_1, client)
    return out


def hits(layout: str, folder: Path, config: str, duration: float, procs: int, seed: int, client: str) -> dict:
    """32 clients on a repeating pool with the default config (memory cache on), and the tree's memory."""
    workers, engine = layout.split(":")
    out: dict = {"workers": int(workers), "engine": engine}
    proc, url = start_layout(layout, folder, "default", config)
    try:
        time.sleep(1.0)
        load(url, 32, procs, 3, "repeat", seed + 200, client)  # fill the cache (every worker's)
        out["c32_hit"] = load(url, 32, procs, duration, "repeat", seed + 200, client)
        out["memory_default"] = tree_memory(proc.pid)
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


def summary(report: dict) -> dict:
    """Per layout: each round's 32-client rate over that round's raw best, and the lone p50 over that
    round's raw batch-1 p50 (the medians decide the targets; min and max show the spread)."""
    out: dict = {}
    for layout in report["layouts"]:
        ratios, deltas = [], []
        for rnd in report["rounds"]:
            raw, r = rnd["raw"], rnd["layouts"][layout]
            ratios.append(r["c32_miss"]["texts_per_s"] / raw["best_texts_per_s"])
            deltas.append(r["c1_miss"]["p50_ms"] - raw["batch1_all_cores_p50_ms"])
        out[layout] = {"ratio_median": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
                       "ratio_max": round(max(ratios), 3),
                       "lone_delta_ms_median": round(statistics.median(deltas), 2),
                       "lone_delta_ms_min": round(min(deltas), 2), "lone_delta_ms_max": round(max(deltas), 2)}
    return out


def markdown(report: dict) -> str:
    """The RESULTS.md tables for a report."""
    lines = [f"client: {report.get('client', 'loadgen')}; backend options: {report.get('options') or 'defaults'}; "
             f"{len(report['rounds'])} rounds, each: the raw encoder, then every layout (cache off)", "",
             "| round | raw best (batch 8 / 16 / 32), texts/s | encoder alone on 32-text windows | raw batch-1 p50 | "
             "layout | 32 clients, cache off | vs raw best | CPU ms/text (workers / engine / master) | "
             "1 client p50 | vs raw batch-1 |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for i, rnd in enumerate(report["rounds"], 1):
        raw = rnd["raw"]
        best, lat1 = raw["best_texts_per_s"], raw["batch1_all_cores_p50_ms"]
        sizes = " / ".join(str(raw[f"batch_{n}"]["texts_per_s"]) for n in (8, 16, 32))
        win = raw["windows_32_planned"]
        for layout, r in rnd["layouts"].items():
            miss, one = r["c32_miss"], r["c1_miss"]
            cpu = miss.get("cpu_ms_per_text", {})
            split = " / ".join(str(cpu.get(k, "-")) for k in ("workers", "engine", "master"))
            lines.append(f"| {i} | {best} ({sizes}) | {win['texts_per_s']} ({win['texts_per_s'] / best:.2f}x, "
                         f"{win['texts_per_call']} texts/call) | {lat1} ms | `{layout}` | {miss['texts_per_s']} "
                         f"({miss['errors']} errors) | {miss['texts_per_s'] / best:.2f}x | {split} | "
                         f"{one['p50_ms']} ms | {one['p50_ms'] - lat1:+.2f} ms |")
    lines += ["", "| layout | 32 clients vs raw best, median (min-max) | lone p50 vs raw batch-1, median (min-max) | "
              "32 clients, cache hits (default config) | resident, each page once / RSS sum / PSS sum | processes |",
              "|---|---:|---:|---:|---:|---:|"]
    for layout, s in report["summary"].items():
        r = report["layouts"][layout]
        hit, mem = r["c32_hit"], r["memory_default"]
        lines.append(f"| `--workers {r['workers']} --engine {r['engine']}` | {s['ratio_median']:.2f}x "
                     f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | {s['lone_delta_ms_median']:+.2f} ms "
                     f"({s['lone_delta_ms_min']:+.2f} to {s['lone_delta_ms_max']:+.2f}) | {hit['texts_per_s']} "
                     f"({hit['errors']} errors) | {mem.get('unique_mib', '-')} / {mem['rss_mib']} / {mem['pss_mib']} MiB "
                     f"| {mem['processes']} |")
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
    p.add_argument("--rounds", type=int, default=3, help="raw encoder then every layout, this many times")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="WORKERS:ENGINE,... (engine on|off)")
    p.add_argument("--client", choices=("wrk", "loadgen"), default="wrk" if wrk_available() else "loadgen")
    p.add_argument("--client-procs", type=int, default=4, help="loadgen processes for 32 clients")
    p.add_argument("--n", type=int, default=1000, help="raw corpus size")
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
    options = json.loads(args.options) if args.options else None
    layouts = args.layouts.split(",")
    report: dict = {"machine": machine_info(), "loadavg_start": loadavg(), "cpus": cpus, "client": args.client,
                    "options": args.options, "rounds": [], "layouts": {}}
    texts, lone_texts = get_corpus(args.n, seed=SEED_32), get_corpus(1000, seed=SEED_1)
    backend, lone = raw_backends(cpus)
    with tempfile.TemporaryDirectory(prefix="vecshim-bench-engine-") as tmp:
        folder = Path(tmp)
        off, default = _write_configs(folder, options)
        servers: dict = {}
        try:
            for layout in layouts:  # every cache-off server up at once; each idles while the others run
                servers[layout] = start_layout(layout, folder, "cache_off", off)
            time.sleep(1.0)
            for _ in range(args.rounds):
                rnd = {"raw": raw(backend, lone, texts, cpus, lone_texts), "layouts": {}}
                for layout in layouts:
                    rnd["layouts"][layout] = misses(*servers[layout], args.duration, args.client_procs, args.client)
                report["rounds"].append(rnd)
                print(json.dumps(rnd), file=sys.stderr, flush=True)
            for layout, (proc, _) in servers.items():
                report["layouts"][layout] = {"memory_after_misses": tree_memory(proc.pid)}
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
        del backend, lone
        for i, layout in enumerate(layouts):
            report["layouts"][layout].update(hits(layout, folder, default, args.duration, args.client_procs,
                                                  1000 * (i + 1), args.client))
    report["summary"] = summary(report)
    report["loadavg_end"] = loadavg()
    emit_report(report, args.json_out)
    print(markdown(report), file=sys.stderr)


if __name__ == "__main__":
    main()
