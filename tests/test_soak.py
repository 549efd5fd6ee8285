"""A short soak in CI: steady load on the real `vecshim serve` (bundled model) for 35 s.

bench/soak.py runs the long version (10 minutes; result in bench/RESULTS.md).
Here: no failed request, no replaced worker, no growth in threads or file
descriptors after a 12 s warm-up, and RSS within 40 MB of its post-warm-up
level.
"""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from soak import run_soak  # noqa: E402

pytestmark = pytest.mark.slow


def test_short_soak_is_flat_and_error_free(tmp_path):
    result = run_soak(duration=35, clients=8, rate=25, interval=1.5, warmup=12, max_rss_growth_mb=40,
                      log_path=str(tmp_path / "server.log"))
    print(f"\nsoak: {result['requests_ok']} ok, {result['errors']} errors, RSS {result['rss_mb']}, "
          f"threads {result['threads']}, fds {result['fds']}")
    assert result["errors"] == 0, result["first_errors"]
    assert result["requests_ok"] >= 0.8 * 25 * 35
    assert result["worker_restarts"] == 0
    assert result["threads"]["end"] <= result["threads"]["steady_first"] + 2, result["threads"]
    assert result["fds"]["end"] <= result["fds"]["steady_first"] + 4, result["fds"]
    assert result["rss_mb"]["max"] - result["rss_mb"]["steady_first"] <= 40, result["rss_mb"]
    assert result["ok"], result["problems"]
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log
