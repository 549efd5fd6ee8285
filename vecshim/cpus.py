"""How many CPUs this process may use (shared by the server's defaults and the local runtimes)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_cpus"]


def available_cpus() -> int:
    """CPUs this process may use: affinity mask and cgroup quota, not the node's core count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:  # cgroup v2 quota, e.g. "200000 100000" for a 2-CPU container limit
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
