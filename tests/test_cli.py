"""The real `vecshim` console script, run as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import VENV_BIN, vecshim_serve
from fakebackend import fake_vector
from vecshim import __version__
from vecshim.server import DEFAULTS, VecshimServer, read_gunicorn_config

VECSHIM = str(VENV_BIN / "vecshim")
TESTS = Path(__file__).resolve().parent

#: A plugin file that serves the tests' FakeBackend, plus a backend whose load() fails.
FAKE_PLUGIN = '''
from fakebackend import FakeBackend
from vecshim import Backend, hookimpl


class BrokenBackend(Backend):
    name = "broken"

    def info(self):
        return {"model": "corrupt"}

    def load(self):
        raise RuntimeError("weights are corrupt")

    def embed(self, texts, task):
        raise AssertionError("never loaded")


@hookimpl
def register_backends(register):
    register(FakeBackend)
    register(BrokenBackend)
'''


def run(*args, input=None, cwd=None, env=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if k not in ("VECSHIM_CONFIG", "VECSHIM_BIND")}
    full_env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(TESTS), **(env or {}))
    return subprocess.run([VECSHIM, *args], input=input, capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def fake_conf(tmp_path):
    """Write a config (in tmp_path/conf) whose relative plugin dir provides `fake` and `broken`."""
    def _write(models=None, **extra):
        conf = tmp_path / "conf"
        (conf / "plugins").mkdir(parents=True, exist_ok=True)
        (conf / "plugins" / "fakes_plugin.py").write_text(FAKE_PLUGIN)
        data = {"plugins": {"dirs": ["plugins"], "entrypoints": False},
                "models": models or {"fake": {"backend": "fake", "options": {"dim": 8}}},
                "cache": {"enabled": False}, **extra}
        path = conf / "vecshim.yaml"
        path.write_text(yaml.safe_dump(data))
        return path
    return _write


def assert_no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr


def test_version():
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"vecshim {__version__}"


# -- config check -------------------------------------------------------------------

def test_config_check_ok(fake_conf, tmp_path):
    path = fake_conf({"a": {"backend": "fake"}, "b": {"backend": "fake", "fallbacks": ["a"]}},
                     default_model="b")
    proc = run("config", "check", str(path), cwd=tmp_path)  # plugins/ resolves next to the file
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ok: 2 model(s): a, b; default 'b'"]


def test_config_check_bad_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("bogus: 1\nmodels:\n  m:\n    backend: fake\n    long_text: chop\n")
    proc = run("config", "check", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == "config error:"
    assert sorted(lines[1:]) == [
        "bogus: Extra inputs are not permitted",
        "models.m.long_text: Input should be 'chunk_mean', 'truncate' or 'error'",
    ]


def test_config_check_bad_backend_options(tmp_path):
    path = tmp_path / "opts.yaml"
    path.write_text("models:\n  st:\n    backend: sentence-transformers\n    options: {model: x, devise: cpu}\n")
    proc = run("config", "check", str(path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "models.st.options.devise: Extra inputs are not permitted" in proc.stderr.splitlines()


def test_config_check_unset_variable(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("models:\n  o:\n    backend: openai\n    options: {model: m, api_key: '${NO_SUCH_KEY_XYZ}'}\n")
    proc = run("config", "check", str(path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "models.o.options.api_key: environment variable NO_SUCH_KEY_XYZ is not set" in proc.stderr


def test_config_check_unknown_backend(tmp_path):
    path = tmp_path / "unknown.yaml"
    path.write_text("plugins: {entrypoints: false}\nmodels:\n  m: {backend: openia}\n")
    proc = run("config", "check", str(path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "unknown backend 'openia'; installed backends: cohere, openai, sentence-transformers" in proc.stderr


def test_config_check_missing_sdk_names_pip_extra(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "xyz.py").write_text(textwrap.dedent("""
        from vecshim import Backend, hookimpl

        class NeedsXyz(Backend):
            name = "needs-xyz"
            requires = ("no_such_module_xyz",)
            extra = "xyz"

            def embed(self, texts, task):
                return []

        @hookimpl
        def register_backends(register):
            register(NeedsXyz)
    """))
    path = tmp_path / "xyz.yaml"
    path.write_text("plugins: {dirs: [plugins]}\nmodels:\n  x: {backend: needs-xyz}\n")
    proc = run("config", "check", str(path), cwd="/")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "models.x: backend 'needs-xyz' needs: pip install 'vecshim[xyz]'" in proc.stderr.splitlines()


def test_config_check_missing_file(tmp_path):
    proc = run("config", "check", str(tmp_path / "nope.yaml"))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "cannot read config file" in proc.stderr
    assert_no_traceback(proc)


def test_config_check_broken_plugin_is_a_config_error(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "wrongargs.py").write_text(
        "from vecshim import hookimpl\n\n@hookimpl\ndef register_backends(registry):\n    pass\n")
    path = tmp_path / "c.yaml"
    path.write_text("plugins: {dirs: [plugins]}\n")
    proc = run("config", "check", str(path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "plugin 'wrongargs'" in proc.stderr
    assert_no_traceback(proc)


# -- backends ---------------------------------------------------------------------------

def test_backends_json_lists_builtins_with_their_plugin():
    proc = run("backends", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    by_name = {b["name"]: b for b in out["backends"]}
    assert {n: b["plugin"] for n, b in by_name.items() if n in ("sentence-transformers", "openai", "cohere")} == {
        "sentence-transformers": "vecshim.backends.local",
        "openai": "vecshim.backends.openai_api",
        "cohere": "vecshim.backends.cohere_api",
    }
    assert by_name["openai"]["class"] == "vecshim.backends.openai_api.OpenAIBackend"
    assert "api_key" in by_name["openai"]["options"]
    plugins = {p["name"]: p for p in out["plugins"]}
    assert plugins["vecshim.backends.local"] == {"name": "vecshim.backends.local", "version": __version__,
                                                 "hooks": ["register_backends"]}


def test_backends_with_config_plugin_dir(fake_conf):
    proc = run("backends", "--config", str(fake_conf()), cwd="/")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()}
    assert rows["fake"] == "fakes_plugin"
    assert rows["sentence-transformers"] == "vecshim.backends.local"


def test_backends_with_config_disable(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plugins: {disable: [vecshim.backends.cohere_api]}\n")
    proc = run("backends", "--json", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "cohere" not in {b["name"] for b in json.loads(proc.stdout)["backends"]}


# -- embed --------------------------------------------------------------------------------

def vectors(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_embed_args_with_a_plugin_backend(fake_conf):
    proc = run("embed", "--config", str(fake_conf()), "hello", "world")
    assert proc.returncode == 0, proc.stderr
    rows = vectors(proc.stdout)
    assert [r["text"] for r in rows] == ["hello", "world"]
    for r in rows:
        np.testing.assert_allclose(r["vector"], fake_vector(r["text"], "passage", 8), rtol=1e-6)


def test_embed_stdin_lines(fake_conf):
    proc = run("embed", "-c", str(fake_conf({"f": {"backend": "fake", "options": {"task_aware": True}}})),
               "--task", "query", input="first line\n\nsecond line\n")
    assert proc.returncode == 0, proc.stderr
    rows = vectors(proc.stdout)
    assert [r["text"] for r in rows] == ["first line", "second line"]
    np.testing.assert_allclose(rows[1]["vector"], fake_vector("second line", "query", 16), rtol=1e-6)


def test_embed_unknown_model_is_a_clean_error(fake_conf):
    proc = run("embed", "-c", str(fake_conf()), "--model", "unknown", "hi")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == "error: unknown model 'unknown'; configured models: fake"
    assert_no_traceback(proc)


def test_embed_ignores_other_broken_models(fake_conf):
    path = fake_conf({"good": {"backend": "fake"}, "bad": {"backend": "broken"}})
    start = time.monotonic()
    proc = run("embed", "-c", str(path), "-m", "good", "hi", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert len(vectors(proc.stdout)[0]["vector"]) == 16
    assert time.monotonic() - start < 20


def test_embed_model_that_fails_to_load(fake_conf):
    path = fake_conf({"good": {"backend": "fake"}, "bad": {"backend": "broken"}})
    proc = run("embed", "-c", str(path), "-m", "bad", "hi", timeout=30)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "error: model 'bad' failed to load: RuntimeError: weights are corrupt" in proc.stderr
    assert_no_traceback(proc)


def test_embed_load_timeout(fake_conf):
    path = fake_conf({"slow": {"backend": "fake", "options": {"load_gate": True}}})
    proc = run("embed", "-c", str(path), "--timeout", "0.5", "hi", timeout=30)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "error: model 'slow' did not load within 0.5 s" in proc.stderr


def test_embed_bad_request_is_a_clean_error(fake_conf):
    proc = run("embed", "-c", str(fake_conf()), "--dimensions", "99", "hi")  # above the native 8
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.startswith("error: ")
    assert_no_traceback(proc)


@pytest.mark.slow
def test_embed_bundled_model_matches_sentence_transformers(st_model):
    proc = run("embed", "-q", input="The quick brown fox\nVectors for Weaviate\n", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = vectors(proc.stdout)
    assert [r["text"] for r in rows] == ["The quick brown fox", "Vectors for Weaviate"]
    assert all(len(r["vector"]) == 384 for r in rows)
    ours = np.asarray(rows[1]["vector"])
    ref = st_model.encode("Vectors for Weaviate")
    assert float(ours @ ref / (np.linalg.norm(ours) * np.linalg.norm(ref))) >= 0.9999


# -- serve ----------------------------------------------------------------------------------

def test_serve_bad_config_exits_before_gunicorn(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m: {backend: sentence-transformers, long_text: chop}\n")
    start = time.monotonic()
    proc = run("serve", "--config", str(path), "--bind", "127.0.0.1:0", timeout=30)
    assert proc.returncode == 2
    assert time.monotonic() - start < 15
    assert "models.m.long_text: Input should be" in proc.stderr
    assert "Booting worker" not in proc.stderr + proc.stdout
    assert "Listening at" not in proc.stderr + proc.stdout


def test_serve_bad_config_from_env(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("default_model: ghost\n")
    proc = run("serve", "--bind", "127.0.0.1:0", env={"VECSHIM_CONFIG": str(path)}, timeout=30)
    assert proc.returncode == 2
    assert "default_model: 'ghost' is not in models (minilm)" in proc.stderr


def test_serve_fake_backend_with_gunicorn_config(fake_conf, tmp_path):
    access = tmp_path / "access.log"
    gconf = tmp_path / "gunicorn_conf.py"
    # bind here must lose to --bind; accesslog must win over vecshim's "-".
    gconf.write_text(f"accesslog = {str(access)!r}\nbind = '127.0.0.1:1'\nthreads = 4\n")
    with vecshim_serve("--config", str(fake_conf()), "--gunicorn-config", str(gconf),
                       env={"PYTHONPATH": str(TESTS)}, ready_timeout=60) as (proc, port):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/vectors", data=b'{"text": "hi"}', method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read())
        np.testing.assert_allclose(body["vector"], fake_vector("hi", "passage", 8), rtol=1e-6)
    assert "POST /vectors" in access.read_text()


def test_gunicorn_config_file_reading(tmp_path):
    gconf = tmp_path / "g.py"
    gconf.write_text("import os\nworkers = 3\nKeepalive = 5\nnot_a_setting = 1\n")
    assert read_gunicorn_config(str(gconf)) == {"workers": 3, "keepalive": 5}
    server = VecshimServer(None, dict(DEFAULTS, **read_gunicorn_config(str(gconf))))
    assert (server.cfg.workers, server.cfg.keepalive, server.cfg.threads) == (3, 5, DEFAULTS["threads"])


@pytest.mark.slow
def test_serve_without_config_serves_the_bundled_model():
    with vecshim_serve(ready_timeout=180) as (proc, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/ready", timeout=5) as r:
            assert r.status == 204
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/meta", timeout=5) as r:
            meta = json.loads(r.read())
        assert meta["default_model"] == "minilm"
        assert proc.poll() is None
