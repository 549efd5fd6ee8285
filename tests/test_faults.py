"""Fault injection under concurrent load: every client gets its vector or a clear JSON error, in bounded time.

tests/test_hosted_e2e.py covers single upstream faults one request at a
time; this file breaks things while many clients are in flight: a storm of
mixed upstream faults (429, 5xx, resets, timeouts, garbage, an HTML proxy
page), Redis killed with SIGKILL and restarted, a gunicorn worker killed
with SIGKILL mid-request, and plugins that raise or hang. After each, the
service recovers by itself.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fake_config
from fakebackend import fake_vector
from redisserver import RedisServer
from test_production import start, stop
from tests.fakes import Fault, malformed, nan, reset, slow, status, wrong_count
from tests.fakes.openai_upstream import FakeOpenAI
from vecshim import Backend, hookimpl

KEY = "sk-faults-0123456789"
BROKEN_CONNECTION = (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError,
                     BrokenPipeError, ConnectionAbortedError)


class Outcome:
    """One client call: status (None: broken connection), parsed body, seconds, resends."""

    def __init__(self, key, status, body, seconds, resends=0, error=None):
        self.key, self.status, self.body, self.seconds, self.resends, self.error = \
            key, status, body, seconds, resends, error


def call(port: int, conn_box: list, path: str, body: bytes, resend: bool = False) -> tuple:
    """POST on the client's keep-alive connection; with `resend`, act like Weaviate >= 1.38.8.

    Go resends up to 2 more times (after 50 ms and 250 ms) when a request on a
    reused connection breaks before any response (CONTRACTS.md §0).
    """
    delays = [0.05, 0.25] if resend else []
    resends = 0
    while True:
        conn = conn_box[0]
        try:
            conn.request("POST", path, body, {"User-Agent": "Go-http-client/1.1"})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheader("Content-Type", ""), data, resends
        except BROKEN_CONNECTION as err:
            conn.close()
            conn_box[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            if not delays:
                return None, "", repr(err).encode(), resends
            time.sleep(delays.pop(0))
            resends += 1


def weaviate_body(text: str) -> bytes:
    return json.dumps({"text": text, "dims": 0, "vector": None, "error": "",
                       "config": {"pooling_strategy": "masked_mean", "task_type": "passage"}}).encode()


def run_clients(port: int, clients: int, make_text, *, until=None, per_client=None, resend=False,
                path="/vectors") -> list[Outcome]:
    """`clients` threads send back to back until `until()` is true (or `per_client` each); return every outcome."""
    out, lock = [], threading.Lock()

    def run(c):
        box = [http.client.HTTPConnection("127.0.0.1", port, timeout=60)]
        i = 0
        while (until is None or not until()) and (per_client is None or i < per_client):
            text = make_text(c, i)
            t0 = time.monotonic()
            st, ctype, data, resends = call(port, box, path, weaviate_body(text), resend)
            body = None
            if st is not None:
                assert ctype.startswith("application/json"), (st, ctype, data[:200])
                body = json.loads(data)
            with lock:
                out.append(Outcome(text, st, body, time.monotonic() - t0, resends,
                                   data.decode(errors="replace") if st is None else None))
            i += 1
        box[0].close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return out


def assert_json_error(o: Outcome, statuses) -> None:
    assert o.status in statuses, (o.status, o.body)
    assert isinstance(o.body, dict) and isinstance(o.body.get("error"), str) and o.body["error"], o.body
    assert "vector" not in o.body and "Traceback" not in o.body["error"]


# -- hosted upstream: a storm of mixed faults under 32 clients ------------------------

class HtmlProxyFakeOpenAI(FakeOpenAI):
    """FakeOpenAI that can also answer like a proxy in front of it: 502 with an HTML page."""

    def _respond(self, handler, request):
        with self._lock:
            fault = self._faults[0] if self._faults else None
            if fault is not None and fault.kind == "html":
                self._faults.popleft()
        if fault is not None and fault.kind == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            handler.send_response(502)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(page)))
            handler.end_headers()
            handler.wfile.write(page)
            return
        super()._respond(handler, request)


def test_mixed_upstream_faults_under_concurrent_load(serve, monkeypatch):
    monkeypatch.setenv("VECSHIM_FAULTS_KEY", KEY)
    budget, timeout = 3.0, 0.5
    with HtmlProxyFakeOpenAI(dim=8, api_key=KEY, latency_s=0.01) as fake:
        model = {"backend": "openai",
                 "options": {"model": "text-embedding-3-small", "base_url": fake.url + "/v1",
                             "api_key": "${VECSHIM_FAULTS_KEY}", "timeout_s": timeout},
                 "batch": {"max_size": 16, "max_wait_ms": 10},
                 "retry": {"max_attempts": 6, "budget_s": budget, "base_delay_s": 0.05, "max_delay_s": 0.3},
                 "circuit": {"failures": 1000, "reset_s": 1.0}, "timeout_s": 10}
        s = serve({"models": {"oai": model}, "cache": {"enabled": False}})
        fake.clear()
        rng = random.Random(9)
        kinds = [status(429, retry_after=0.1), status(500), status(502), status(503), reset(), slow(timeout * 3),
                 malformed(), wrong_count(), nan(), Fault("html")]
        faults = [rng.choice(kinds) for _ in range(60)]
        for f in faults:
            fake.inject(f)
        stop_at = time.monotonic() + 6
        outcomes = run_clients(s.port, 32, lambda c, i: f"storm {c}/{i}", until=lambda: time.monotonic() > stop_at)
        assert fake._faults == type(fake._faults)(), "the storm did not consume every injected fault"
        ok = [o for o in outcomes if o.status == 200]
        for o in outcomes:
            assert o.status is not None, o.error
            if o.status == 200:
                assert o.body["vector"] == pytest.approx(fake.vector(o.key), abs=1e-6)
            else:
                assert_json_error(o, (502, 503, 504))
            # Retries stop within the budget; one more attempt may be in flight, and the batch wait.
            assert o.seconds < budget + timeout + 1.5, (o.seconds, o.body)
        assert len(outcomes) > 100 and len(ok) / len(outcomes) > 0.8, (len(ok), len(outcomes))
        # Faults over: every client gets its vector again, without a restart.
        after = run_clients(s.port, 8, lambda c, i: f"after {c}/{i}", per_client=2)
        assert len(after) == 16 and all(o.status == 200 and o.body["vector"] == pytest.approx(fake.vector(o.key), abs=1e-6)
                             for o in after)


# -- Redis killed with SIGKILL and restarted mid-load ---------------------------------

def redis_dbsize(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
        c.sendall(b"*1\r\n$6\r\nDBSIZE\r\n")
        return int(c.recv(64).split(b"\r\n")[0][1:])


def test_redis_killed_and_restarted_under_load(serve):
    redis_server = RedisServer().start()
    try:
        cfg = fake_config(dim=16, delay_s=0.002, batch={"max_size": 32, "max_wait_ms": 5})
        # No memory tier: every request goes to Redis.
        cfg["cache"] = {"memory_items": 0, "redis_url": redis_server.url, "redis_timeout_s": 0.05}
        s = serve(cfg)
        t0 = time.monotonic()
        events = {}

        def chaos():
            time.sleep(1.5)
            redis_server.proc.send_signal(signal.SIGKILL)
            redis_server.proc.wait(5)
            events["killed"] = time.monotonic() - t0
            time.sleep(2.0)
            redis_server.start()
            events["restarted"] = time.monotonic() - t0

        th = threading.Thread(target=chaos)
        th.start()
        outcomes = run_clients(s.port, 16, lambda c, i: f"cached text {(c * 7 + i) % 150}",
                               until=lambda: time.monotonic() - t0 > 8)
        th.join(10)
        assert set(events) == {"killed", "restarted"}
        for o in outcomes:
            assert o.status == 200, (o.status, o.body, o.error)
            np.testing.assert_array_equal(np.asarray(o.body["vector"], dtype=np.float32),
                                          fake_vector(o.key, "passage", 16))
        assert max(o.seconds for o in outcomes) < 1.0, max(o.seconds for o in outcomes)
        assert s.state.cache.redis.errors >= 1, "the outage was never noticed"
        # The cache reconnected by itself: keys written after the restart are there.
        assert redis_dbsize(redis_server.port) > 0
        assert s.state.not_ready_reason() is None
    finally:
        redis_server.stop()


# -- a gunicorn worker killed with SIGKILL mid-request ---------------------------------

def _children(pid: int) -> set[int]:
    """The master's HTTP workers: its children except the engine process, if any."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = {int(p) for p in f.read().split()}
    workers = set()
    for p in kids:
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except FileNotFoundError:  # reaped between the two reads (the killed worker): no longer a child
            continue
        if b"vecshim.engine" not in cmdline:
            workers.add(p)
    return workers


@pytest.mark.slow
def test_worker_killed_mid_request_is_respawned_and_clients_recover(tmp_path):
    cfg = {"models": {"fake": {"backend": "fake", "options": {"dim": 8, "delay_s": 0.2},
                               "batch": {"max_size": 8, "max_wait_ms": 5}}},
           "cache": {"enabled": False}}
    proc = start(tmp_path, cfg, "--workers", "2")
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        t0 = time.monotonic()
        facts = {}

        def chaos():
            time.sleep(1.5)  # every client is mid-request by now (each request takes >= 0.2 s)
            victim = sorted(workers)[0]
            facts["killed_at"] = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while time.monotonic() - facts["killed_at"] < 30:
                now = _children(proc.pid)
                if len(now) == 2 and victim not in now:
                    facts["respawned_s"] = time.monotonic() - facts["killed_at"]
                    facts["new"] = now - workers
                    break
                time.sleep(0.02)
            while time.monotonic() - facts["killed_at"] < 30:  # the new worker serves
                c = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=5)
                try:
                    c.request("GET", "/.well-known/ready")
                    if c.getresponse().status == 204 and len(_children(proc.pid)) == 2:
                        facts["ready_s"] = time.monotonic() - facts["killed_at"]
                        break
                except OSError:
                    pass
                finally:
                    c.close()
                time.sleep(0.05)

        th = threading.Thread(target=chaos)
        th.start()
        outcomes = run_clients(proc.port, 16, lambda c, i: f"worker kill {c}/{i}",
                               until=lambda: time.monotonic() - t0 > 6, resend=True)
        th.join(40)
        assert "respawned_s" in facts and facts["respawned_s"] < 10, facts
        assert "ready_s" in facts, facts
        broken = [o for o in outcomes if o.resends]
        assert broken, "the kill hit no request in flight; the test proves nothing"
        for o in outcomes:
            # With Weaviate's resend every request ends with its vector; nothing is a non-JSON error.
            assert o.status == 200, (o.status, o.body, o.error)
            assert o.body["vector"] == pytest.approx(fake_vector(o.key, "passage", 8).tolist(), abs=1e-6)
            assert o.seconds < 10
        print(f"\nworker respawned in {facts['respawned_s']:.2f} s, ready in {facts['ready_s']:.2f} s; "
              f"{len(broken)} of {len(outcomes)} requests were broken mid-flight and resent; "
              f"slowest call {max(o.seconds for o in outcomes):.2f} s")
        # Without the resend (Weaviate < 1.38.8) a broken request is a connection error, never a bad vector.
        assert all(o.resends <= 2 for o in outcomes)
    finally:
        stop(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Booting worker" in log and "SIGKILL" in log


# -- plugins that raise or hang ---------------------------------------------------------

class Raiser(Backend):
    """Raises a plain RuntimeError (not a BackendError) on texts containing RAISE."""

    name = "raiser"

    def info(self):
        return {"model": "fake-8d"}

    def embed(self, texts, task):
        if any("RAISE" in t for t in texts):
            raise RuntimeError("kaboom inside the plugin")
        return np.stack([fake_vector(t, "passage", 8) for t in texts])


class Hanger(Backend):
    """Blocks on texts containing HANG until the test releases it."""

    name = "hanger"
    release = threading.Event()

    def info(self):
        return {"model": "fake-8d"}

    def embed(self, texts, task):
        if any("HANG" in t for t in texts):
            Hanger.release.wait(60)
        return np.stack([fake_vector(t, "passage", 8) for t in texts])


class BadPlugins:
    @hookimpl
    def register_backends(self, register):
        register(Raiser)
        register(Hanger)


def plugin_config() -> dict:
    batch = {"max_size": 32, "max_wait_ms": 20, "workers": 1}
    return {"models": {
        "fake": {"backend": "fake", "options": {"dim": 8}},
        "raiser": {"backend": "raiser", "batch": batch},
        "hanger": {"backend": "hanger", "batch": batch, "timeout_s": 1.0},
    }, "cache": {"enabled": False}}


def test_plugin_that_raises_fails_only_its_requests_with_a_json_502(serve):
    s = serve(plugin_config(), plugins=[BadPlugins()])
    outcomes = run_clients(s.port, 16, lambda c, i: f"RAISE {c}" if c % 4 == 0 else f"fine {c}",
                           per_client=1, path="/models/raiser/vectors")
    assert len(outcomes) == 16
    for o in outcomes:
        if "RAISE" in o.key:
            assert_json_error(o, (502,))
            assert o.body["error"] == "backend 'raiser' failed (RuntimeError); see the server log"
            assert "kaboom" not in o.body["error"]
        else:  # batch mates of the failing text still get their own vectors
            assert o.status == 200, o.body
            assert o.body["vector"] == pytest.approx(fake_vector(o.key, "passage", 8).tolist(), abs=1e-7)
    assert s.state.not_ready_reason() is None


def test_plugin_that_hangs_times_out_with_a_json_504_and_others_keep_serving(serve):
    Hanger.release.clear()
    s = serve(plugin_config(), plugins=[BadPlugins()])
    try:
        c = s.client()
        t0 = time.monotonic()
        r = c.vectors("HANG forever", base="/models/hanger")
        took = time.monotonic() - t0
        assert r.status == 504 and "did not answer within 1 s" in r.json()["error"], r.body
        assert 1.0 <= took < 1.0 + 0.5, took
        # The hung call holds the model's only encoder thread; the watchdog replaces that
        # thread once the call outlives timeout_s, so the next text is served, not a 504.
        t0 = time.monotonic()
        r = c.vectors("an innocent text", base="/models/hanger")
        assert r.status == 200 and time.monotonic() - t0 < 1.5, r.body
        assert r.json()["vector"] == pytest.approx(fake_vector("an innocent text", "passage", 8).tolist(), abs=1e-7)
        # Everything else is unaffected while the plugin hangs.
        other = s.client()
        for i in range(20):
            t0 = time.monotonic()
            r = other.vectors(f"other model {i}")
            assert r.status == 200 and time.monotonic() - t0 < 0.5
        for path in ("/meta", "/.well-known/live"):
            t0 = time.monotonic()
            assert other.request("GET", path).status in (200, 204) and time.monotonic() - t0 < 0.5
        other.close()
    finally:
        Hanger.release.set()
    # The plugin returns: the model recovers by itself, cancelled requests are not embedded.
    deadline = time.monotonic() + 5
    while True:
        r = c.vectors("after the hang", base="/models/hanger")
        if r.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status == 200 and r.json()["vector"] == pytest.approx(
        fake_vector("after the hang", "passage", 8).tolist(), abs=1e-7)
    c.close()
