"""One-shot benchmark: raw model limit vs the served service, as a markdown table.

Starts the server command (or uses ``--url``), waits for
``GET /.well-known/ready`` == 204, then runs, in this order and each in its
own process:

1. ``raw_limit.py`` (server up but idle),
2. ``loadgen.py`` at concurrency 1, unique texts (cache misses),
3. ``loadgen.py`` at concurrency ``--high``, unique texts (cache misses),
4. ``loadgen.py`` at concurrency ``--high``, repeating texts (cache hits after warm-up),

prints "served vs raw" and stops only the server process it started.

Usage::

    python bench/run_all.py --server-cmd ".venv/bin/vecshim serve --bind 127.0.0.1:{port} --config {config}" \\
        --config config/default.yaml
    python bench/run_all.py --url http://127.0.0.1:8080
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_SERVER_CMD = ".venv/bin/vecshim serve --bind 127.0.0.1:{port}"


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> float:
    """Poll ``/.well-known/ready`` until 204; return seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/.well-known/ready", timeout=0.5) as resp:
                if resp.status == 204:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def start_server(cmd: str, log_path: Path) -> subprocess.Popen:
    """Start the server in its own session so it and its workers can be stopped as one."""
    log = open(log_path, "wb")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(shlex.split(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def stop_server(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM our server PID, wait, then clean up whatever is left in its own process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    # The group was created by start_server, so it holds only processes we
    # started (e.g. gunicorn workers orphaned by a crashed master).
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def run_json(script: str, *args: str, timeout: float) -> dict:
    """Run a bench script with ``--json`` and return its report."""
    cmd = [sys.executable, str(BENCH / script), *args, "--json"]
    print("$", " ".join(shlex.quote(c) for c in cmd[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{script} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def _ratio(served: float, raw: float | None) -> str:
    """Format served/raw as a ratio, or '-'."""
    return f"{served / raw:.2f}" if raw else "-"


def markdown(raw: dict | None, runs: list[tuple[str, dict]]) -> str:
    """The "served vs raw" table."""
    r = raw["results"] if raw else {}
    single = r.get("single", {}).get("texts_per_s")
    arrival = r.get("batch_32_arrival", {}).get("texts_per_s")
    ordered = r.get("batch_32_sorted", {}).get("texts_per_s")
    best_key = max((k for k in r if k.startswith("batch_") and "texts_per_s" in r[k]),
                   key=lambda k: r[k]["texts_per_s"], default=None)
    best = r[best_key]["texts_per_s"] if best_key else None
    lines = []
    if raw:
        lines += [f"Raw limit ({raw['threads']} torch threads, n={raw['n']}): single {single} texts/s "
                  f"(p50 {r['single']['p50_ms']} ms), b32 arrival {arrival}, b32 length-sorted {ordered}, "
                  f"best {best_key} {best} texts/s.", ""]
    lines += [
        "| run | texts/s | p50 ms | p95 ms | p99 ms | errors | vs single | vs b32 arrival | vs b32 sorted | vs best raw |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rep in runs:
        tps = rep["texts_per_s"]
        lines.append(f"| {name} | {tps} | {rep['p50_ms']} | {rep['p95_ms']} | {rep['p99_ms']} | {rep['errors']} | "
                     f"{_ratio(tps, single)} | {_ratio(tps, arrival)} | {_ratio(tps, ordered)} | {_ratio(tps, best)} |")
    if raw and runs and runs[0][0].startswith("c=1"):
        lines += ["", f"1-client latency: served p50 {runs[0][1]['p50_ms']} ms vs raw encode([text]) "
                      f"p50 {r['single']['p50_ms']} ms (overhead {runs[0][1]['p50_ms'] - r['single']['p50_ms']:.2f} ms)."]
    return "\n".join(lines)


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group()
    target.add_argument("--server-cmd", default=None,
                        help=f"server command; {{port}} and {{config}} are filled in (default: {DEFAULT_SERVER_CMD!r})")
    target.add_argument("--url", default=None, help="use an already running server (localhost only)")
    p.add_argument("--config", default="", help="value for {config} in --server-cmd")
    p.add_argument("--port", type=int, default=0, help="port for {port} (default: a free one)")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per loadgen run")
    p.add_argument("--high", type=int, default=32, help="high concurrency level")
    p.add_argument("--raw-n", type=int, default=1000)
    p.add_argument("--raw-threads", type=int, default=None)
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--verify", type=int, default=50, help="responses compared with a direct encode (c=1 run)")
    p.add_argument("--json-out", default=None, help="also write all reports to this file")
    args = p.parse_args()

    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        port = args.port or free_port()
        cmd = (args.server_cmd or DEFAULT_SERVER_CMD + (" --config {config}" if args.config else ""))
        cmd = cmd.format(port=port, config=args.config)
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tempfile.mkdtemp(prefix="vecshim-bench-")) / "server.log"
        print(f"starting: {cmd}  (log: {log_path})", file=sys.stderr, flush=True)
        proc = start_server(cmd, log_path)
    try:
        waited = wait_ready(url, proc, args.ready_timeout)
        print(f"ready after {waited:.1f} s", file=sys.stderr, flush=True)
        raw = None
        if not args.skip_raw:
            raw_args = ["--n", str(args.raw_n)] + (["--threads", str(args.raw_threads)] if args.raw_threads else [])
            raw = run_json("raw_limit.py", *raw_args, timeout=900)
        budget = args.duration + 120
        common = ["--url", url, "--duration", str(args.duration)]
        runs = [
            ("c=1 unique", run_json("loadgen.py", *common, "--concurrency", "1", "--seed", "101",
                                    "--verify", str(args.verify), timeout=budget)),
            (f"c={args.high} unique", run_json("loadgen.py", *common, "--concurrency", str(args.high),
                                               "--seed", "102", timeout=budget)),
            (f"c={args.high} repeat (cache)", run_json(
                "loadgen.py", *common, "--concurrency", str(args.high), "--corpus", "repeat",
                "--distinct", "200", "--warmup", "400", "--seed", "103", timeout=budget)),
        ]
    finally:
        if proc is not None:
            stop_server(proc)
            print(f"stopped server pid {proc.pid} (exit {proc.returncode})", file=sys.stderr)
    table = markdown(raw, runs)
    print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"url": url, "raw": raw, "runs": dict(runs), "table": table},
                                                  indent=1))


if __name__ == "__main__":
    main()
