"""Hostile and heavy traffic against a real `vecshim serve` (bundled MiniLM): light-client latency.

Phases, each with the same light client (LIGHT_CLIENTS keep-alive connections
sending one Weaviate-style /vectors request after another):

  baseline  the light client alone (the raw limit the others are compared to)
  hostile   + 64 short-body connections (Content-Length 1000, 10 bytes sent)
            + 64 slowloris connections (one header byte per connection per second)
  heavy     + one /v1/embeddings call with 15 texts of 1,000,000 characters
  encoder   the encoder's own speed: one request of W windows timed alone,
            from which the default `batch.max_request_tokens` is judged

`--worker gthread` runs the same phases on gunicorn's plain gthread worker
(light requests then time out after --light-timeout s instead of hanging).

    flock /tmp/vecshim-bench.lock .venv/bin/python bench/hostile.py --json /tmp/hostile.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_info, percentile  # noqa: E402
from run_all import free_port, start_server, stop_server, wait_ready  # noqa: E402

VENV_BIN = Path(sys.executable).parent
LIGHT_CLIENTS = 4
VOCAB = ("vector database embedding weaviate object property schema module query passage "
         "the quick brown fox jumps over lazy dog river thames london bridge").split()


def vec_body(text: str) -> bytes:
    return json.dumps({"text": text, "dims": 0, "vector": None, "error": "",
                       "config": {"pooling_strategy": "masked_mean", "task_type": "passage"}},
                      separators=(",", ":")).encode()


def light(port: int, stop: threading.Event, out: list, timeout: float, seed: int) -> None:
    """One keep-alive client: request after request until `stop`; (latency, status) to `out`."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    while not stop.is_set():
        body = vec_body(" ".join(rng.choices(VOCAB, k=12)))
        t = time.perf_counter()
        try:
            conn.request("POST", "/vectors", body, {"Content-Length": str(len(body))})
            r = conn.getresponse()
            r.read()
            out.append((time.perf_counter() - t, r.status))
        except OSError:
            out.append((time.perf_counter() - t, "timeout/error"))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.close()


def run_light(port: int, seconds: float, timeout: float, during=None) -> dict:
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=light, args=(port, stop, out, timeout, i)) for i in range(LIGHT_CLIENTS)]
    for t in threads:
        t.start()
    extra = during() if during else None
    if not during:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout + 5)
    lat = sorted(x for x, _ in out)
    statuses: dict = {}
    for _, s in out:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"requests": len(out), "p50_s": round(percentile(lat, 50), 4), "p99_s": round(percentile(lat, 99), 4),
            "max_s": round(lat[-1], 4) if lat else None, "statuses": statuses, **({"heavy": extra} if extra else {})}


def hold_hostile(port: int):
    """Open 64 short-body and 64 slowloris connections; returns (sockets, stop event, dripper)."""
    short, slow = [], []
    for _ in range(64):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"text\":\"a")
        short.append(s)
    for _ in range(64):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"P")
        slow.append(s)
    stop = threading.Event()
    line = b"OST /vectors HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 4000

    def drip():
        i = 0
        while not stop.wait(1.0):
            for s in slow:
                try:
                    s.send(line[i:i + 1])
                except OSError:
                    pass
            i += 1

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    return short + slow, stop, t


def words(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    text = " ".join(rng.choices(VOCAB, k=n_chars // 5))
    while len(text) < n_chars:
        text += " " + " ".join(rng.choices(VOCAB, k=1000))
    return text[:n_chars]


def heavy_call(port: int) -> dict:
    text = words(1_000_000, 1)
    body = json.dumps({"input": [text[k * 997:] + text[:k * 997] for k in range(15)], "model": "minilm"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t = time.perf_counter()
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    took = time.perf_counter() - t
    conn.close()
    try:
        msg = json.loads(data).get("error", {})
        msg = msg.get("message") if isinstance(msg, dict) else msg
    except ValueError:
        msg = data[:100].decode(errors="replace")
    return {"status": r.status, "seconds": round(took, 2), "body_mb": round(len(body) / 2**20, 1),
            "error": (msg or "")[:160]}


def encoder_speed(port: int, windows: int) -> dict:
    """One request of about `windows` 256-token windows, timed alone; tokens/s from its `usage`."""
    text = words(windows * 256 * 5, 7)  # about 5 characters per token
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"input": [text], "model": "minilm"}).encode()
    t = time.perf_counter()
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    took = time.perf_counter() - t
    conn.close()
    tokens = data.get("usage", {}).get("prompt_tokens") if r.status == 200 else None
    return {"status": r.status, "chars": len(text), "tokens": tokens, "seconds": round(took, 2),
            "tokens_per_s": round(tokens / took) if tokens else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the baseline and hostile phases")
    ap.add_argument("--light-timeout", type=float, default=30.0)
    ap.add_argument("--worker", default="vecshim", choices=["vecshim", "gthread"])
    ap.add_argument("--windows", type=int, default=64, help="size of the encoder-speed request, in windows")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="vecshim-hostile-"))
    cfg = tmp / "vecshim.yaml"
    cfg.write_text("cache: {enabled: false}\nplugins: {entrypoints: false}\n")
    cmd = f"{VENV_BIN / 'vecshim'} serve --config {cfg} --bind 127.0.0.1:{port} --workers 1"
    if args.worker == "gthread":
        gconf = tmp / "gthread.py"
        gconf.write_text("worker_class = 'gthread'\n")
        cmd += f" --gunicorn-config {gconf}"
    proc = start_server(cmd, tmp / "server.log")
    report = {"machine": machine_info(), "worker": args.worker, "load_avg_start": os.getloadavg()}
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, 180)
        run_light(port, 3, args.light_timeout)  # warm-up
        report["baseline"] = run_light(port, args.seconds, args.light_timeout)
        socks, stop, dripper = hold_hostile(port)
        time.sleep(1.0)
        report["hostile"] = run_light(port, args.seconds, args.light_timeout)
        report["hostile"]["held_open"] = sum(_open(s) for s in socks)
        stop.set()
        dripper.join()
        for s in socks:
            s.close()
        report["heavy"] = run_light(port, 0, args.light_timeout, during=lambda: heavy_call(port))
        report["encoder"] = encoder_speed(port, args.windows)
    finally:
        report["load_avg_end"] = os.getloadavg()
        stop_server(proc)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


def _open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
