"""One log format for the whole process tree, quiet probes and HTTP clients, a drain summary, state gauges."""
from __future__ import annotations

import http.server
import io
import json
import logging
import signal
import threading
import time

import httpx
import pytest

from conftest import free_port
from goclient import GoClient
from test_production import fake_model, metric, start, stop
from vecshim.config import LoggingConfig
from vecshim.logs import configure_logging

pytestmark = pytest.mark.slow


def json_lines(path) -> list[dict]:
    """Every line of the log; each must be JSON (the test fails on a plain-text line)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def test_master_and_workers_log_json_with_pids_and_a_drain_summary(tmp_path):
    cfg = {**fake_model(delay_s=1.5), "logging": {"format": "json"}, "cache": {"enabled": False}}
    proc = start(tmp_path, cfg, "--workers", "1")
    try:
        c = GoClient("127.0.0.1", proc.port)
        for _ in range(3):
            assert c.request("GET", "/.well-known/ready").status == 204
            assert c.request("GET", "/.well-known/live").status == 204
        statuses = []
        slow = threading.Thread(target=lambda: statuses.append(GoClient("127.0.0.1", proc.port).vectors("slow").status))
        slow.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the slow request is in flight (plus this scrape itself)
            if metric(c.request("GET", "/metrics").body.decode(), "vecshim_requests_in_flight") >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        slow.join(30)
        assert statuses == [200]
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    records = json_lines(tmp_path / "server.log")
    by_logger = {}
    for rec in records:
        assert {"ts", "level", "logger", "pid", "msg"} <= set(rec), rec
        by_logger.setdefault(rec["logger"], []).append(rec)
    master = {r["pid"] for r in by_logger["gunicorn.error"] if r["msg"].startswith("Listening at")}
    workers = {r["pid"] for r in by_logger["vecshim.model"]}
    assert len(master) == 1 and len(workers) == 1 and master != workers
    assert any(r["msg"] == "Handling signal: term" and r["pid"] in master for r in by_logger["gunicorn.error"])
    ready = next(r for r in by_logger["vecshim.model"] if "ready" in r["msg"])
    assert ready["model"] == "fake"
    access = by_logger["vecshim.access"]
    assert not [r for r in access if "/.well-known/" in r["path"]]  # probes are DEBUG
    assert [r["status"] for r in access if r["path"] == "/vectors"] == [200]
    (summary,) = [r for r in by_logger["vecshim.server"] if r["msg"].startswith("drain summary")]
    assert summary["pid"] in workers
    assert summary["in_flight"] >= 1 and summary["left"] == 0 and summary["drain_s"] >= 0


def test_debug_level_shows_probe_lines(tmp_path):
    proc = start(tmp_path, {**fake_model(), "logging": {"format": "json", "level": "DEBUG"}}, "--workers", "1")
    try:
        assert GoClient("127.0.0.1", proc.port).request("GET", "/.well-known/live").status == 204
        time.sleep(0.3)
    finally:
        stop(proc)
    probes = [r for r in json_lines(tmp_path / "server.log")
              if r["logger"] == "vecshim.access" and r["path"] == "/.well-known/live"]
    assert probes and probes[0]["level"] == "DEBUG"


def test_text_logs_carry_the_pid_in_master_and_worker_lines(tmp_path):
    proc = start(tmp_path, fake_model(), "--workers", "1")
    stop(proc)
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert any(" INFO [" in line and "gunicorn.error: Listening at" in line for line in lines), lines
    assert any(" INFO [" in line and "vecshim.model: model 'fake' ready" in line for line in lines), lines
    assert not any(line.startswith("[") for line in lines), lines  # gunicorn's own format is gone


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("level, shown", [("INFO", False), ("DEBUG", True)])
def test_upstream_http_request_lines_are_debug(level, shown):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configure_logging(LoggingConfig(level=level, format="json"), [])
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_vecshim_handler", False))
    stream = io.StringIO()
    old = handler.setStream(stream)
    try:
        with httpx.Client() as client:
            assert client.get(f"http://127.0.0.1:{server.server_port}/v1/embeddings").status_code == 200
    finally:
        handler.setStream(old)
        server.shutdown()
        server.server_close()
        configure_logging(LoggingConfig(), [])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    http_lines = [r for r in lines if r["logger"] == "httpx"]
    assert bool(http_lines) == shown
    assert all(r["level"] == "DEBUG" and "HTTP Request: GET" in r["msg"] for r in http_lines)


def test_model_and_circuit_state_gauges(tmp_path):
    down = free_port()  # nothing listens: every call fails, the circuit opens
    cfg = {**fake_model(), "cache": {"enabled": False}}
    cfg["models"]["down"] = {"backend": "openai", "retry": {"max_attempts": 1}, "circuit": {"failures": 1, "reset_s": 600},
                             "options": {"model": "m", "base_url": f"http://127.0.0.1:{down}/v1", "timeout_s": 2}}
    proc = start(tmp_path, cfg, "--workers", "1", ready=False)
    try:
        c = None
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            try:
                c = c or GoClient("127.0.0.1", proc.port)
                text = c.request("GET", "/metrics").body.decode()
            except OSError:
                c = None
                time.sleep(0.2)
                continue
            if metric(text, "vecshim_model_state", model="down", state="failed") == 1 \
                    and metric(text, "vecshim_model_state", model="fake", state="ready") == 1:
                break
            time.sleep(0.2)
        assert metric(text, "vecshim_model_state", model="down", state="failed") == 1, text
        assert metric(text, "vecshim_model_state", model="down", state="ready") == 0
        assert metric(text, "vecshim_model_state", model="fake", state="ready") == 1
        assert metric(text, "vecshim_model_state", model="fake", state="loading") == 0
        assert metric(text, "vecshim_circuit_state", model="down", state="open") == 1
        assert metric(text, "vecshim_circuit_state", model="down", state="closed") == 0
        assert metric(text, "vecshim_circuit_state", model="fake", state="closed") == 1
    finally:
        stop(proc)
