"""Memory of one replica serving a cross-encoder reranker: engine vs a copy per HTTP worker.

    python bench/rerank_memory.py [--workers 4]

Builds a tiny random-weight cross-encoder (no hub download), serves it beside
the bundled MiniLM with `vecshim serve` three ways (`--workers N` with the
engine, `--workers N --engine off`, `--workers 1`), sends 40 rerank requests
to each, and prints the process count, the RSS and PSS summed over the
master's process tree, and how many of those processes have torch mapped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, wait_http  # noqa: E402
from test_rerank_cross_encoder import save_tiny_cross_encoder  # noqa: E402

from benchlib import tree_memory, tree_pids  # noqa: E402


def measure(config: Path, args: list[str]) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("vecshim")), "serve", "--config", str(config),
                             "--bind", f"127.0.0.1:{port}", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/.well-known/ready", 300, proc=proc)
        body = json.dumps({"query": "which animal jumps?", "documents": ["a fox jumps", "Paris"] * 8}).encode()
        for _ in range(40):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/rerank", body, {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=60).read()
        time.sleep(1)
        mem = tree_memory(proc.pid)
        torch = sum("libtorch" in Path(f"/proc/{p}/maps").read_text() for p in tree_pids(proc.pid))
        return {"args": " ".join(args), "processes": mem["processes"], "rss_mib": round(mem["rss_mib"]),
                "pss_mib": round(mem["pss_mib"]), "with_torch": torch}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ce = save_tiny_cross_encoder(Path(tmp) / "ce")
        config = Path(tmp) / "vecshim.yaml"
        config.write_text(json.dumps({"rerankers": {"ce": {"backend": "cross-encoder", "options": {"model": str(ce)}}}}))
        n = str(args.workers)
        print("| layout | processes | RSS sum | PSS sum | processes with torch mapped |")
        print("|---|---:|---:|---:|---:|")
        for layout in (["--workers", n], ["--workers", n, "--engine", "off"], ["--workers", "1"]):
            r = measure(config, layout)
            print(f"| `{r['args']}` | {r['processes']} | {r['rss_mib']} MiB | {r['pss_mib']} MiB | {r['with_torch']} |",
                  flush=True)


if __name__ == "__main__":
    main()
