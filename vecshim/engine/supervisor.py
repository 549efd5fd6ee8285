"""Master side: start the engine, restart it when it dies, swap it on reload, stop it last.

Runs inside the gunicorn master (server.py hooks, which `vecshim serve` and
deploy/gunicorn.conf.py both install): `start` in on_starting, `reload` in
on_reload (before gunicorn forks the new workers), `stop` in on_exit (after
every worker has drained). Workers find the current socket through
`worker_socket()` when nothing passed it to `create_app`. A retired engine stops once the
last worker started before the reload has exited, so requests in flight on
old workers finish on the engine they began on.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from . import channel

__all__ = ["EngineSupervisor", "read_facts", "worker_socket"]

log = logging.getLogger("vecshim.engine")
#: (master pid, its supervisor): what the master's forked workers inherit.
_serving: tuple[int, "EngineSupervisor"] | None = None


def worker_socket() -> str | None:
    """In a gunicorn worker whose master runs an engine: the engine's socket; else None."""
    if _serving is not None and _serving[0] == os.getppid() and _serving[1].current is not None:
        return _serving[1].socket_path
    return None


def read_facts(path: str, timeout: float, until_settled: bool = False) -> dict | None:
    """The engine's facts; with `until_settled`, wait until no model or reranker is still loading."""
    deadline = time.monotonic() + timeout
    facts = None
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(path)
                channel.send(s, b"W")
                while True:
                    facts = json.loads(channel.recv(s)[1:])
                    states = [m["state"] for m in [*facts["models"].values(), *facts.get("rerankers", {}).values()]]
                    if not until_settled or all(st != "loading" for st in states):
                        return facts
        except (OSError, channel.ChannelClosed, ValueError):
            time.sleep(0.1)
    return facts


class _Engine:
    """One engine process and its socket."""

    def __init__(self, config_path: str | None, path: str):
        self.path = path
        cmd = [sys.executable, "-m", "vecshim.engine", "--socket", path]
        if config_path:
            cmd += ["--config", config_path]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ))
        self.started = time.monotonic()
        #: Whether `collect()` saw it dead before anything else reaped it (so returncode is its status).
        self.status_known = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        self.collect()
        return self.proc.poll() is None

    def collect(self) -> None:
        """If the engine has died, reap it with its exit status.

        gunicorn's master reaps every child with `waitpid(-1)` and drops the
        status of those that are not its workers, after which `Popen` can only
        report exit code 0. So this runs first, from the master's reaping
        (`EngineSupervisor.claim_exits`) and from `alive()`: `waitid(WNOWAIT)`
        tells whether the engine is dead without reaping it, then `Popen`
        reaps it and keeps the status in `returncode`.
        """
        if self.proc.returncode is not None:
            return
        try:
            dead = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped already, by a waitpid(-1) that ran first
            return
        if dead:
            self.status_known = self.proc.poll() is not None

    def ended(self) -> str:
        """How the dead engine ended, as a log line's predicate."""
        code = self.proc.returncode
        if not self.status_known or code is None:
            return "ended (its status was reaped before vecshim could read it)"
        if code >= 0:
            return f"exited with code {code}"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")

    def terminate(self, timeout: float) -> None:
        """SIGTERM (the engine drains its queues), SIGKILL after `timeout`."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("engine %d did not drain within %.0f s; killing it", self.pid, timeout)
                self.proc.kill()
                self.proc.wait(5)
        _metrics_dead(self.pid)


def _metrics_dead(pid: int) -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, path)


class EngineSupervisor:
    """The replica's engine as seen from the gunicorn master."""

    def __init__(self, config_path: str | None, reload_timeout: float = 120.0):
        self.config_path = config_path
        self.reload_timeout = reload_timeout
        self.dir = tempfile.mkdtemp(prefix="vecshim-engine-")
        self.generation = 0
        self.current: _Engine | None = None
        self._retired: list[tuple[_Engine, set[int]]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = None

    @property
    def socket_path(self) -> str:
        """Where workers forked now find the engine."""
        return self.current.path

    def _path(self) -> str:
        return os.path.join(self.dir, f"engine-{self.generation}.sock")

    def start(self, server=None) -> None:
        """Start the first engine and the thread that restarts it when it dies."""
        global _serving
        self._server = server
        _serving = (os.getpid(), self)
        self.current = _Engine(self.config_path, self._path())
        log.info("engine started (pid %d)", self.current.pid)
        reap = getattr(server, "reap_workers", None)
        if callable(reap):  # gunicorn's arbiter: claim dead engines before its waitpid(-1) does
            def reap_workers():
                self.claim_exits()
                reap()

            server.reap_workers = reap_workers
        threading.Thread(target=self._watch, name="vecshim-engine-supervisor", daemon=True).start()

    def claim_exits(self) -> None:
        """Record and reap every dead engine (current and retired), so its exit status is known."""
        for eng in [self.current, *(e for e, _ in list(self._retired))]:
            if eng is not None:
                eng.collect()

    def _watch(self) -> None:
        delay = 0.5
        while not self._stopping.wait(0.2):
            with self._lock:
                eng = self.current
                if not eng.alive() and not self._stopping.is_set():
                    _metrics_dead(eng.pid)
                    quick = time.monotonic() - eng.started < 10
                    delay = min(delay * 2, 30.0) if quick else 0.5
                    log.error("engine %d %s; restarting it in %.1f s; workers answer 503 meanwhile",
                              eng.pid, eng.ended(), delay if quick else 0)
                    if quick:
                        self._stopping.wait(delay)
                        if self._stopping.is_set():
                            return
                    self.current = _Engine(self.config_path, eng.path)
                    log.info("engine restarted (pid %d)", self.current.pid)
                self._retire_idle()

    def _retire_idle(self) -> None:
        live = set(getattr(self._server, "WORKERS", {}) or {})
        for item in list(self._retired):
            eng, old_workers = item
            if not (old_workers & live):
                self._retired.remove(item)
                threading.Thread(target=eng.terminate, args=(self._grace(),), daemon=True).start()

    def _grace(self) -> float:
        cfg = getattr(self._server, "cfg", None)
        return float(getattr(cfg, "graceful_timeout", 30))

    def reload(self, server) -> None:
        """HUP: start a new engine and wait until its models settle, before gunicorn forks new workers."""
        self._server = server
        with self._lock:
            old = self.current
            before = read_facts(old.path, 5.0) if old.alive() else None
            self.generation += 1
            new = _Engine(self.config_path, self._path())
            log.info("reload: new engine started (pid %d); waiting for its models", new.pid)
            after = read_facts(new.path, self.reload_timeout, until_settled=True)
            self.current = new
            self._retired.append((old, set(server.WORKERS)))
        _compare(before, after)

    def stop(self, timeout: float = 30.0) -> None:
        """After the workers drained: stop every engine, the current one last."""
        self._stopping.set()
        with self._lock:
            engines = [e for e, _ in self._retired] + ([self.current] if self.current else [])
            self._retired.clear()
        for eng in engines:
            eng.terminate(timeout)
        try:
            for name in os.listdir(self.dir):
                os.unlink(os.path.join(self.dir, name))
            os.rmdir(self.dir)
        except OSError:
            pass


def _compare(before: dict | None, after: dict | None) -> None:
    """Log loudly when a reload changes a model's vector space."""
    if after is None:
        log.error("reload: the new engine did not answer; workers answer 503 until it does")
        return
    for name, info in after["models"].items():
        if info["state"] != "ready":
            log.error("reload: model %r is %s after the reload: %s", name, info["state"], info.get("error"))
        old = (before or {}).get("models", {}).get(name)
        if old and old.get("state") == "ready" and info["state"] == "ready" \
                and old["fingerprint"] != info["fingerprint"]:
            log.error("reload: MODEL %r CHANGED ITS VECTOR SPACE (fingerprint %s -> %s): vectors Weaviate "
                      "stored before no longer match new ones; re-vectorise or roll back",
                      name, old["fingerprint"], info["fingerprint"])
