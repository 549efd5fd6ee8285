"""Real gunicorn: graceful shutdown, metrics across workers, auth, logs, request ids."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import VENV_BIN, free_port, wait_http
from goclient import GoClient, vec_request

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
PLUGIN = "import sys\nsys.path.insert(0, %r)\nfrom fakebackend import FakePlugin\nfake = FakePlugin()\n" % str(TESTS)
SECRET = "tok-3f9a1c2e-very-secret"


def start(tmp_path, config: dict, *args, ready=True):
    (tmp_path / "plugins").mkdir(exist_ok=True)
    # A plugin file that exposes FakeBackend through a module-level object's hookimpl.
    (tmp_path / "plugins" / "fakeplugin.py").write_text(
        PLUGIN + "from vecshim import hookimpl\n\n@hookimpl\ndef register_backends(register):\n"
        "    fake.register_backends(register)\n")
    config = {"plugins": {"dirs": ["plugins"], "entrypoints": False}, **config}
    path = tmp_path / "vecshim.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if k not in ("VECSHIM_CONFIG", "PROMETHEUS_MULTIPROC_DIR")}
    proc = subprocess.Popen([str(VENV_BIN / "vecshim"), "serve", "--config", str(path),
                             "--bind", f"127.0.0.1:{port}", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.port, proc.logfile = port, log
    if ready:
        wait_http(f"http://127.0.0.1:{port}/.well-known/ready", 60, proc=proc)
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.logfile.close()


def start_in_flight(port: int, n: int) -> tuple[list[threading.Thread], list[int]]:
    """`n` clients each sending one `/vectors` request; their statuses land in the list."""
    results: list[int] = []

    def call(i):
        c = GoClient("127.0.0.1", port)
        results.append(c.vectors(f"in flight {i}").status)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def fake_model(**opts):
    return {"models": {"fake": {"backend": "fake", "options": {"dim": 8, **opts}}}}


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{.*\})? ([0-9.eE+-]+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_sigterm_finishes_every_in_flight_request_and_readiness_turns_503(tmp_path):
    # One worker: the watcher connection and the requests must reach the same process.
    proc = start(tmp_path, {**fake_model(delay_s=0.3), "cache": {"enabled": False}}, "--workers", "1")
    try:
        watcher = GoClient("127.0.0.1", proc.port)
        assert watcher.request("GET", "/.well-known/ready").status == 204
        threads, results = start_in_flight(proc.port, 24)
        time.sleep(0.4)  # all connected, the first batch is embedding, the rest queued
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        draining = watcher.request("GET", "/.well-known/ready")
        for t in threads:
            t.join(30)
        assert sorted(results) == [200] * 24
        assert draining.status == 503 and "shutting down" in draining.json()["error"]
        assert proc.wait(30) == 0
    finally:
        stop(proc)


def test_metrics_are_summed_across_two_workers(tmp_path):
    proc = start(tmp_path, {**fake_model(), "cache": {"enabled": True}}, "--workers", "2")
    try:
        n = 40
        pids = set()
        for i in range(n):  # a new connection each time spreads requests over both workers
            c = GoClient("127.0.0.1", proc.port)
            r = c.vectors(f"metric text {i % 20}")
            assert r.status == 200
            c.close()
        for _ in range(6):
            c = GoClient("127.0.0.1", proc.port)
            text = c.request("GET", "/metrics").body.decode()
            c.close()
            assert metric(text, "vecshim_requests_total", route="/vectors", model="fake", status="200") == n
            pids.add(len(re.findall(r"vecshim_model_load_seconds", text)))
        assert metric(text, "vecshim_cache_hits_total", model="fake") + \
            metric(text, "vecshim_cache_misses_total", model="fake") == n
        assert metric(text, "vecshim_batch_size_count", model="fake") >= 20
        assert metric(text, "vecshim_build_info") == 1
        assert metric(text, "vecshim_request_seconds_count", route="/vectors", model="fake") == n
        assert metric(text, "vecshim_model_load_seconds", model="fake") > 0
    finally:
        stop(proc)


def test_bearer_auth_per_route_group_and_open_health(tmp_path):
    cfg = {**fake_model(), "server": {"auth": {"embed_tokens": [SECRET], "metrics_tokens": ["metrics-tok-77"]}}}
    proc = start(tmp_path, cfg)
    try:
        c = GoClient("127.0.0.1", proc.port)
        assert c.request("GET", "/.well-known/ready").status == 204
        assert c.request("GET", "/.well-known/live").status == 204
        r = c.request("POST", "/vectors", vec_request("x"))
        assert r.status == 401 and r.json()["error"] and r.headers["www-authenticate"].startswith("Bearer")
        assert c.request("POST", "/vectors", vec_request("x"), {"Authorization": "Bearer wrong"}).status == 401
        assert c.request("POST", "/vectors", vec_request("x"), {"Authorization": f"Bearer {SECRET}"}).status == 200
        assert c.request("GET", "/metrics").status == 401
        assert c.request("GET", "/metrics", headers={"Authorization": f"Bearer {SECRET}"}).status == 401
        assert c.request("GET", "/metrics", headers={"Authorization": "Bearer metrics-tok-77"}).status == 200
    finally:
        stop(proc)
    log = (tmp_path / "server.log").read_text()
    assert SECRET not in log and "metrics-tok-77" not in log


def test_json_logs_with_request_id_and_no_texts(tmp_path):
    cfg = {**fake_model(fail_on="EXPLODE"), "logging": {"format": "json"},
           "server": {"auth": {"embed_tokens": [SECRET]}}}
    proc = start(tmp_path, cfg)
    auth = {"Authorization": f"Bearer {SECRET}"}
    try:
        c = GoClient("127.0.0.1", proc.port)
        r = c.request("POST", "/vectors", vec_request("private words here"), {**auth, "X-Request-ID": "abc-123"})
        assert r.status == 200 and r.headers["x-request-id"] == "abc-123"
        r = c.request("POST", "/vectors", vec_request("another private text"), auth)
        generated = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)  # 16 hex per-process prefix + 16 hex counter
        assert c.request("POST", "/vectors", vec_request("EXPLODE please"), auth).status == 502
        time.sleep(0.3)
    finally:
        stop(proc)
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()
             if line.startswith("{")]
    access = [rec for rec in lines if rec.get("logger") == "vecshim.access"]
    tagged = {rec.get("request_id") for rec in access}
    assert {"abc-123", generated} <= tagged
    ok = next(rec for rec in access if rec.get("request_id") == "abc-123")
    assert ok["status"] == 200 and ok["model"] == "fake" and ok["path"] == "/vectors" and ok["ms"] >= 0
    raw = (tmp_path / "server.log").read_text()
    assert "private words" not in raw and "another private text" not in raw and SECRET not in raw


def test_plain_gunicorn_with_the_shipped_config(tmp_path):
    """`gunicorn -c deploy/gunicorn.conf.py 'vecshim.app:create_app()'` serves like `vecshim serve`."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fakeplugin.py").write_text(
        PLUGIN + "from vecshim import hookimpl\n\n@hookimpl\ndef register_backends(register):\n"
        "    fake.register_backends(register)\n")
    path = tmp_path / "vecshim.yaml"
    path.write_text(yaml.safe_dump({"plugins": {"dirs": ["plugins"], "entrypoints": False}, **fake_model()}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(VECSHIM_CONFIG=str(path), VECSHIM_BIND=f"127.0.0.1:{port}")
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "gunicorn"), "-c", str(TESTS.parent / "deploy" / "gunicorn.conf.py"),
                             "vecshim.app:create_app()"], env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.port, proc.logfile = port, log
    try:
        wait_http(f"http://127.0.0.1:{port}/.well-known/ready", 60, proc=proc)
        c = GoClient("127.0.0.1", port)
        r = c.vectors("plain gunicorn")
        assert r.status == 200 and r.json()["dims"] == 8
        metrics = c.request("GET", "/metrics").body.decode()
        assert metric(metrics, "vecshim_requests_total", route="/vectors", model="fake", status="200") == 1
    finally:
        stop(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize("name, value, conf", [
    ("VECSHIM_ENGINE", "sometimes", "shipped"),
    ("VECSHIM_WORKERS", "many", "shipped"),
    ("VECSHIM_MAX_REQUESTS", "-3", "shipped"),
    # a gunicorn config of the operator's own with only vecshim's hooks: the engine is decided in on_starting
    ("VECSHIM_ENGINE", "sometimes", "hooks only"),
])
def test_plain_gunicorn_bad_setting_is_one_line_not_a_traceback(tmp_path, name, value, conf):
    """A bad `VECSHIM_*` value under plain gunicorn: status 2, the setting named in one line, no traceback."""
    if conf == "shipped":
        gconf = TESTS.parent / "deploy" / "gunicorn.conf.py"
    else:
        gconf = tmp_path / "gunicorn_conf.py"
        gconf.write_text("from vecshim.server import HOOKS\nworkers = 2\non_starting = HOOKS['on_starting']\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "VECSHIM_CONFIG")}
    env.update({name: value, "VECSHIM_BIND": f"127.0.0.1:{free_port()}"})
    proc = subprocess.run([str(VENV_BIN / "gunicorn"), "-c", str(gconf), "--bind", env["VECSHIM_BIND"],
                           "vecshim.app:create_app()"], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert errors == [f"config error: {name}={value!r}: " + ("expected auto, on or off" if name == "VECSHIM_ENGINE"
                                                             else f"expected a whole number >= "
                                                                  f"{1 if name == 'VECSHIM_WORKERS' else 0}")], out


def test_requests_gunicorn_rejects_still_get_json(tmp_path):
    """A malformed request line or oversized headers never reach Flask; the reply is JSON anyway."""
    import socket

    proc = start(tmp_path, fake_model())
    try:
        for raw in (b"GARBAGE\r\n\r\n", b"GET /meta HTTP/9.9\r\nHost: x\r\n\r\n",
                    b"GET /meta HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
                sock.sendall(raw)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            assert 400 <= status < 500, head
            assert b"content-type: application/json" in head.lower(), head
            assert json.loads(body)["error"].startswith(str(status))
        assert GoClient("127.0.0.1", proc.port).vectors("still serving").status == 200
    finally:
        stop(proc)
