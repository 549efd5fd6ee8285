"""One engine per replica (real `vecshim serve`): one model copy, shared batches, crash, drain, reload."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import VENV_BIN, free_port, wait_http
from goclient import GoClient
from fakebackend import FakeBackend
from test_production import PLUGIN, fake_model, metric, start, start_in_flight, stop
from vecshim.engine import channel
from vecshim.engine.process import Engine
from vecshim.server import DEFAULT_WORKERS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def maps_onnxruntime(pid: int) -> bool:
    """Whether ONNX Runtime's library is loaded in `pid` (the model runs there)."""
    try:
        return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def meta(port: int) -> dict:
    c = GoClient("127.0.0.1", port)
    try:
        reply = c.request("GET", "/meta")
        assert reply.status == 200
        return reply.json()
    finally:
        c.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat  # a zombie has exited


def wait_for(pred, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()

def _in_process_config(tmp_path: Path, **model) -> Path:
    """A config of the fake model (its plugin in tmp_path/plugins), for an Engine run in this process."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fakeplugin.py").write_text(
        PLUGIN + "from vecshim import hookimpl\n\n@hookimpl\ndef register_backends(register):\n"
        "    fake.register_backends(register)\n")
    cfg = tmp_path / "vecshim.yaml"
    cfg.write_text(yaml.safe_dump({"plugins": {"dirs": ["plugins"], "entrypoints": False},
                                   **fake_model(**model), "cache": {"enabled": False}}))
    return cfg


def _connect(path: Path) -> socket.socket | None:
    """A connection to the engine's socket, None while it does not listen yet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None



def hup_under_load(proc, cfg_path: Path, edit, request, swapped, *, clients: int, timeout: float):
    """Reload a server by SIGHUP while `clients` threads each call `request(i, n)` (n = 0, 1, ...) in a loop.

    After 0.5 s of load, `edit(cfg)` changes the YAML config at `cfg_path` and
    the server gets SIGHUP; the load goes on until `swapped()` holds (at most
    `timeout` s) and 0.5 s more. Returns `swapped()`'s value (falsy if it never
    held) and every request's status; a refused or reset connection is a failed
    request too, recorded as its repr.
    """
    statuses: list = []
    stop_load = threading.Event()

    def client(i):
        n = 0
        while not stop_load.is_set():
            try:
                statuses.append(request(i, n))
            except OSError as err:
                statuses.append(repr(err))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        cfg = yaml.safe_load(cfg_path.read_text())
        edit(cfg)
        cfg_path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        after = wait_for(swapped, timeout, 0.2)
        time.sleep(0.5)
    finally:
        stop_load.set()
        for t in threads:
            t.join(timeout)
    return after, statuses


def test_one_model_copy_whatever_the_workers(tmp_path):
    """Three HTTP workers, the bundled ONNX model: only the engine process has ONNX Runtime loaded."""
    proc = start(tmp_path, {"models": {"minilm": {"backend": "sentence-transformers"}}}, "--workers", "3")
    try:
        info = meta(proc.port)
        engine = info["engine"]["pid"]
        assert info["engine"]["mode"] == "engine" and info["engine"]["up"] is True
        kids = children(proc.pid)
        assert engine in kids and len(kids) == 4  # the engine and three workers
        assert [pid for pid in kids if maps_onnxruntime(pid)] == [engine]
        # Every worker answers /meta with the same engine, and vectors come back whole.
        seen = set()
        for i in range(12):
            c = GoClient("127.0.0.1", proc.port)
            m = c.request("GET", "/meta").json()
            seen.add((m["engine"]["pid"], m["engine"]["worker_pid"]))
            v = np.asarray(c.vectors(f"one copy {i}").json()["vector"], dtype=np.float32)
            assert v.shape == (384,) and abs(float(np.linalg.norm(v)) - 1) < 1e-4
            c.close()
        assert {e for e, _ in seen} == {engine}
        assert {w for _, w in seen} <= set(kids) - {engine}
    finally:
        stop(proc)


def test_batches_fill_from_every_worker(tmp_path):
    proc = start(tmp_path, {**fake_model(delay_s=0.05), "cache": {"enabled": False}}, "--workers", "3")
    try:
        statuses = []

        def client(i):
            for j in range(6):
                c = GoClient("127.0.0.1", proc.port)  # new connections spread over the workers
                statuses.append(c.vectors(f"mix {i} {j}").status)
                c.close()

        def mixed() -> float:
            text = GoClient("127.0.0.1", proc.port).request("GET", "/metrics").body.decode()
            count = metric(text, "vecshim_batch_workers_count", model="fake")
            return count - metric(text, "vecshim_batch_workers_bucket", model="fake", le="1.0")

        for _ in range(5):  # bounded rounds; one normally suffices
            threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            if mixed() > 0:
                break
        assert set(statuses) == {200}
        assert mixed() > 0, "no batch carried texts from two workers"
    finally:
        stop(proc)


def test_engine_killed_answers_json_503_then_recovers(tmp_path):
    proc = start(tmp_path, {**fake_model(), "cache": {"enabled": False}}, "--workers", "2")
    try:
        engine = meta(proc.port)["engine"]["pid"]
        assert GoClient("127.0.0.1", proc.port).vectors("before").status == 200
        os.kill(engine, signal.SIGKILL)  # a child of the server this test started

        def refused():
            c = GoClient("127.0.0.1", proc.port)
            r = c.vectors("during")
            c.close()
            return r if r.status == 503 else None

        r = wait_for(refused, 20)
        assert r is not None, "no 503 while the engine was down"
        assert r.headers["content-type"] == "application/json" and "engine" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1

        def back():
            m = meta(proc.port)
            return m if m["engine"]["up"] and m["engine"]["pid"] not in (None, engine) \
                and m["model"]["state"] == "ready" else None

        m = wait_for(back, 60, 0.2)
        assert m is not None, "the engine was not restarted"
        new = m["engine"]["pid"]
        assert children(proc.pid).count(new) == 1
        # That was one worker; each reconnects on its own (under load the other one was seen 70 ms
        # later, answering 503 meanwhile, or still booting) and logs it once it serves again.
        workers = set(children(proc.pid)) - {new}
        assert len(workers) == 2

        def all_back():
            log = (tmp_path / "server.log").read_text()
            return all(re.search(rf"\[{w}\] vecshim\.engine: (using the engine|engine restarted) \(pid {new}\)", log)
                       for w in workers)

        assert wait_for(all_back, 60, 0.1), "a worker did not take the restarted engine's facts"
        # The master says how the engine ended, although gunicorn reaps it (and drops its status).
        assert f"engine {engine} was killed by SIGKILL (out of memory?)" in (tmp_path / "server.log").read_text()
        for i in range(6):
            c = GoClient("127.0.0.1", proc.port)
            assert c.vectors(f"after {i}").status == 200
            c.close()
    finally:
        stop(proc)


def test_a_watcher_that_joins_while_a_model_loads_ends_on_the_loaded_facts(tmp_path):
    """A worker that starts watching while a model loads is left with the facts of the loaded model.

    The engine answers a new watcher with the facts of that moment and publishes new facts to
    every watcher when a model's state changes. Once (engine restarted under load, test above)
    the model became ready between a watcher's first facts being built ("loading") and sent: the
    publish of "ready" reached that worker first, the stale "loading" last, and the worker kept
    refusing requests for a model that was ready. Here that order is forced, not left to load:
    the first facts are held until the model has loaded and the loader is done (bounded, since an
    engine that keeps the order makes the loader's publish wait for this send).
    """
    cfg = _in_process_config(tmp_path, load_gate=True)
    held = threading.Event()
    publishes = []

    class HeldEngine(Engine):
        def facts(self):
            facts = super().facts()
            if threading.current_thread().name == "vecshim-engine-conn" and not held.is_set():
                held.set()  # a watcher's first facts, built: now the model finishes loading
                FakeBackend.gate.set()
                self.models._loader.join(3.0)
            return facts

        def publish(self):
            counted = held.is_set()  # sent to the watcher (before, the loader waits at the gate)
            super().publish()
            if counted:
                publishes.append(self.facts()["models"]["fake"]["state"])

    FakeBackend.gate.clear()
    engine = HeldEngine(str(cfg), str(tmp_path / "engine.sock"))
    server = threading.Thread(target=engine.serve, daemon=True)
    server.start()

    try:
        watcher = wait_for(lambda: _connect(tmp_path / "engine.sock"), 30)
        assert watcher is not None, "the engine did not listen"
        with watcher:
            watcher.settimeout(30)
            channel.send(watcher, b"W")
            assert held.wait(30)
            engine.models._loader.join(30)
            assert not engine.models._loader.is_alive() and publishes and publishes[-1] == "ready"
            # One frame for the first facts and one per publish; the last one sent must say "ready".
            frames = [json.loads(channel.recv(watcher)[1:]) for _ in range(1 + len(publishes))]
            assert [f["models"]["fake"]["state"] for f in frames][-1] == "ready", \
                [f["models"]["fake"]["state"] for f in frames]
    finally:
        FakeBackend.gate.clear()
        engine.stop()
        server.join(30)


def test_sigterm_drains_the_engine_after_the_workers(tmp_path):
    proc = start(tmp_path, {**fake_model(delay_s=0.3), "cache": {"enabled": False}}, "--workers", "2")
    try:
        engine = meta(proc.port)["engine"]["pid"]
        threads, results = start_in_flight(proc.port, 24)
        time.sleep(0.4)  # connected; the first batch is embedding, the rest queued in the engine
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert sorted(results) == [200] * 24
        assert proc.wait(30) == 0
        assert not alive(engine)
    finally:
        stop(proc)


def test_hup_reload_swaps_workers_and_engine_with_zero_failed_requests(tmp_path):
    proc = start(tmp_path, {**fake_model(delay_s=0.01), "cache": {"enabled": False}}, "--workers", "2")
    try:
        before = meta(proc.port)
        old_engine = before["engine"]["pid"]
        assert before["model"]["dimension"] == 8

        def vectors(i, n):
            c = GoClient("127.0.0.1", proc.port)
            try:
                return c.vectors(f"reload {i} {n}").status
            finally:
                c.close()

        def edit(cfg):
            cfg["models"]["fake"]["options"]["dim"] = 16  # a different vector space

        def swapped():
            m = meta(proc.port)
            return m if m["engine"]["pid"] != old_engine and m["model"]["dimension"] == 16 else None

        after, statuses = hup_under_load(proc, tmp_path / "vecshim.yaml", edit, vectors, swapped,
                                         clients=8, timeout=60)
        assert after is not None, "the reload did not bring a new engine"
        assert len(statuses) > 50 and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
        assert wait_for(lambda: not alive(old_engine), 40, 0.2), "the old engine kept running"
        log = (tmp_path / "server.log").read_text()
        assert "CHANGED ITS VECTOR SPACE" in log and "'fake'" in log
    finally:
        stop(proc)


def test_one_worker_keeps_the_models_in_process(tmp_path):
    proc = start(tmp_path, fake_model(), "--workers", "1")
    try:
        info = meta(proc.port)["engine"]
        assert info["mode"] == "in-process" and info["pid"] in children(proc.pid)
        assert len(children(proc.pid)) == 1
    finally:
        stop(proc)


def test_plain_gunicorn_with_the_shipped_config_runs_the_engine(tmp_path):
    """`gunicorn -c deploy/gunicorn.conf.py 'vecshim.app:create_app()'`: the default workers, one engine, one model copy;
    HUP swaps the engine (gunicorn re-reads the config file), SIGTERM stops it."""
    (tmp_path / "vecshim.yaml").write_text(yaml.safe_dump({"models": {"minilm": {"backend": "sentence-transformers"}}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "VECSHIM_WORKERS",
                                                            "VECSHIM_ENGINE")}
    env.update(VECSHIM_CONFIG="vecshim.yaml", VECSHIM_BIND=f"127.0.0.1:{port}", HF_HUB_OFFLINE="1")
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "gunicorn"), "-c", str(ROOT / "deploy" / "gunicorn.conf.py"),
                             "vecshim.app:create_app()"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/.well-known/ready", 180, proc=proc)
        info = meta(port)
        engine = info["engine"]["pid"]
        assert info["engine"]["mode"] == "engine" and info["engine"]["up"] is True
        assert info["model"]["state"] == "ready"
        kids = children(proc.pid)
        assert engine in kids and len(kids) == DEFAULT_WORKERS + 1
        assert [pid for pid in kids if maps_onnxruntime(pid)] == [engine]
        c = GoClient("127.0.0.1", port)
        assert len(c.vectors("plain gunicorn").json()["vector"]) == 384
        c.close()

        proc.send_signal(signal.SIGHUP)
        swapped = wait_for(lambda: meta(port)["engine"]["pid"] not in (None, engine), 120, 0.2)
        assert swapped, "HUP did not start a new engine"
        assert wait_for(lambda: not alive(engine), 60, 0.2), "the old engine kept running"
        new = meta(port)["engine"]["pid"]
        assert [pid for pid in children(proc.pid) if maps_onnxruntime(pid)] == [new]
        c = GoClient("127.0.0.1", port)
        assert c.vectors("after the reload").status == 200
        c.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    assert code == 0
    assert not alive(new)


def test_the_sigterm_handler_takes_no_lock_the_interrupted_code_may_hold(tmp_path, monkeypatch):
    """A signal handler runs in the main thread between bytecodes, possibly while that thread holds
    the lock of the Event its loop waits on; a handler that takes that lock never returns."""
    from test_production import PLUGIN

    from vecshim.engine.process import Engine

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fakeplugin.py").write_text(
        PLUGIN + "from vecshim import hookimpl\n\n@hookimpl\ndef register_backends(register):\n"
        "    fake.register_backends(register)\n")
    config = tmp_path / "vecshim.yaml"
    config.write_text(yaml.safe_dump({"plugins": {"dirs": ["plugins"], "entrypoints": False}, **fake_model(),
                                      "cache": {"enabled": False}}))
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    engine = Engine(str(config), str(tmp_path / "engine.sock"))
    returned = threading.Event()

    def interrupted_main_thread():
        with engine._stop._cond:  # what Event.wait holds for an instant on every wake-up
            engine.stop(signal.SIGTERM, None)
            returned.set()

    t = threading.Thread(target=interrupted_main_thread, daemon=True)
    t.start()
    assert returned.wait(30), "the SIGTERM handler blocked on a lock its own thread held"
    t.join(30)
    assert engine._stopping


def test_the_master_imports_the_worker_code_once_and_loads_no_runtime():
    """Workers share the master's copy of their code (forked, frozen out of the collector); the
    master itself starts no thread and imports no inference runtime."""
    code = ("import gc, sys, threading; from vecshim.server import share_worker_code; share_worker_code(); "
            "import json; print(json.dumps({'frozen': gc.get_freeze_count(), 'threads': threading.active_count(), "
            "'mods': [m for m in ('vecshim.app', 'vecshim.worker', 'vecshim.engine.proxy', 'torch', "
            "'onnxruntime', 'sentence_transformers', 'transformers') if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["frozen"] > 1000
    assert facts["threads"] == 1
    assert facts["mods"] == ["vecshim.app", "vecshim.worker", "vecshim.engine.proxy"]


def test_the_supervisor_records_how_an_engine_ended(tmp_path):
    from vecshim.engine.supervisor import _Engine

    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [not, a, mapping]\n")
    eng = _Engine(str(bad), str(tmp_path / "e.sock"))  # refuses the config and exits
    assert wait_for(lambda: not eng.alive(), 60, 0.05)
    assert re.fullmatch(r"exited with code [1-9]\d*", eng.ended())
    assert eng.proc.returncode == int(eng.ended().rsplit(" ", 1)[1])  # Popen reaped it, with its status
    eng.proc.wait(5)
    live = _Engine(None, str(tmp_path / "f.sock"))
    try:
        os.kill(live.pid, signal.SIGKILL)
        assert wait_for(lambda: not live.alive(), 30, 0.05)
        assert live.ended() == "was killed by SIGKILL (out of memory?)"
    finally:
        live.proc.wait(5)


def test_a_watcher_that_stops_reading_is_dropped_without_holding_up_the_others(tmp_path, monkeypatch):
    from vecshim.engine import process

    monkeypatch.setattr(process, "WATCH_SEND_TIMEOUT_S", 0.3)
    cfg = _in_process_config(tmp_path)
    engine = Engine(str(cfg), str(tmp_path / "engine.sock"))
    server = threading.Thread(target=engine.serve, daemon=True)
    server.start()

    def watch():
        s = _connect(tmp_path / "engine.sock")
        if s is None:
            return None
        channel.send(s, b"W")
        s.settimeout(30)
        channel.recv(s)  # its first facts
        return s

    stuck = wait_for(watch, 30)
    good = watch()
    got = []

    def read_good():
        try:
            while True:
                got.append(channel.recv(good))
        except (OSError, channel.ChannelClosed):
            pass

    reader = threading.Thread(target=read_good, daemon=True)
    reader.start()
    # Far more facts than the stuck watcher's socket buffers hold: without a bound on each send,
    # publishing blocks for good on the watcher that never reads, and nobody gets facts again.
    size = len(channel.pack_json(b"F", engine.facts()))
    rounds = 4 * (1 << 20) // size
    publisher = threading.Thread(target=lambda: [engine.publish() for _ in range(rounds)], daemon=True)
    try:
        publisher.start()
        publisher.join(60)
        assert not publisher.is_alive(), "publishing was held up by a watcher that stopped reading"
        assert len(engine._watchers) == 1
        assert wait_for(lambda: len(got) >= rounds, 30), (len(got), rounds)  # the good watcher got them all
        stuck.settimeout(5)
        with pytest.raises((OSError, channel.ChannelClosed)):
            while True:  # the dropped watcher finds the end of its stream after what was buffered
                channel.recv(stuck)
    finally:
        stuck.close()
        good.close()
        engine.stop()
        server.join(30)
