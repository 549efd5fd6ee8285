"""The real `vecshim` console script, run as a subprocess."""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import VENV_BIN, free_port, stop_process, vecshim_serve
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
    assert sorted(proc.stderr.splitlines()) == [
        f"{path}: bogus: unknown key",
        f"{path}: models.m.backend: unknown backend 'fake'; installed backends: cohere, openai, "
        "sentence-transformers",
        f"{path}: models.m.long_text: Input should be 'chunk_mean', 'truncate' or 'error'",
    ]


def test_config_check_bad_backend_options(tmp_path):
    path = tmp_path / "opts.yaml"
    path.write_text("models:\n  st:\n    backend: sentence-transformers\n    options: {model: x, devise: cpu}\n")
    proc = run("config", "check", str(path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert f"{path}: models.st.options.devise: unknown key (did you mean 'device'?)" in proc.stderr.splitlines()


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
    assert proc.stderr.splitlines() == [f"{path}: models.m.backend: unknown backend 'openia'; installed backends: "
                                        "cohere, openai, sentence-transformers (did you mean 'openai'?)"]


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
    assert f"{path}: models.x: backend 'needs-xyz' needs: pip install 'vecshim[xyz]'" in proc.stderr.splitlines()


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


def test_config_check_reports_six_different_mistakes_in_one_run(fake_conf, tmp_path):
    empty_key = tmp_path / "empty.key"
    empty_key.write_text("  \n")
    path = fake_conf({
        "a": {"backend": "fake", "batch": {"max_wiat_ms": 5}},                       # 1 unknown key
        "b": {"backend": "faek"},                                                    # 2 unknown backend
        "c": {"backend": "fake", "options": {"dimm": 8}},                            # 3 unknown option
        "d": {"backend": "fake", "fallbacks": ["ghost"]},                            # 4 fallback to nothing
        "e": {"backend": "openai", "options": {"model": "m", "api_key": "${NO_SUCH_VAR_17}"}},  # 5 unset var
        "f": {"backend": "cohere", "options": {"api_key_file": str(empty_key)}},    # 6 empty key file
    }, default_model="a")
    proc = run("config", "check", str(path), cwd="/")
    assert (proc.returncode, proc.stdout) == (2, "")
    lines = proc.stderr.splitlines()
    assert sorted(lines) == sorted([
        f"{path}: models.a.batch.max_wiat_ms: unknown key (did you mean 'max_wait_ms'?)",
        f"{path}: models.b.backend: unknown backend 'faek'; installed backends: broken, cohere, fake, openai, "
        "sentence-transformers (did you mean 'fake'?)",
        f"{path}: models.c.options.dimm: unknown key (did you mean 'dim'?)",
        f"{path}: models.d.fallbacks.0: 'ghost' is not another configured model",
        f"{path}: models.e.options.api_key: environment variable NO_SUCH_VAR_17 is not set",
        f"{path}: models.f.options.api_key_file: backend 'cohere': api_key_file {str(empty_key)!r} is empty",
    ]), proc.stderr
    assert_no_traceback(proc)


HOSTED_KEY_VARS = {"OPENAI_API_KEY": "", "AZURE_OPENAI_API_KEY": "", "CO_API_KEY": "", "COHERE_API_KEY": ""}


def test_config_check_missing_hosted_key(tmp_path):
    path = tmp_path / "hosted.yaml"
    path.write_text("models:\n  o: {backend: openai, options: {model: text-embedding-3-small}}\n")
    proc = run("config", "check", str(path), env=HOSTED_KEY_VARS)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == [
        f"{path}: models.o.options.api_key: no API key: set options.api_key, options.api_key_file or "
        "OPENAI_API_KEY (none is set or all are empty)"]
    # The same file passes once the key is in the environment; a base_url server needs none.
    assert run("config", "check", str(path), env={"OPENAI_API_KEY": "sk-test"}).returncode == 0
    path.write_text("models:\n  o: {backend: openai, options: {model: m, base_url: 'http://127.0.0.1:9/v1'}}\n")
    assert run("config", "check", str(path), env=HOSTED_KEY_VARS).returncode == 0


def test_config_check_optional_model_problems_are_warnings(fake_conf):
    path = fake_conf({"main": {"backend": "fake"},
                      "extra": {"backend": "openai", "required": False, "options": {"model": "m"}},
                      "later": {"backend": "cohere", "required": False,
                                "options": {"api_key": "${NO_SUCH_VAR_17}"}}}, default_model="main")
    proc = run("config", "check", str(path), cwd="/", env=HOSTED_KEY_VARS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ok: 3 model(s): extra, later, main; default 'main'"]
    assert sorted(proc.stderr.splitlines()) == [
        f"{path}: models.extra.options.api_key: warning: no API key: set options.api_key, options.api_key_file "
        "or OPENAI_API_KEY (none is set or all are empty) (required: false: the model will be unavailable)",
        f"{path}: models.later.options.api_key: warning: environment variable NO_SUCH_VAR_17 is not set "
        "(required: false: the model will be unavailable)",
    ]
    # A required default model cannot be optional: that stays an error.
    path = fake_conf({"main": {"backend": "fake", "required": False}})
    proc = run("config", "check", str(path), cwd="/")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{path}: models.main.required: the default model must be required "
                                        "(Weaviate's /vectors calls it)"]


def test_config_check_key_file_problems(tmp_path):
    folder = tmp_path / "a-directory"
    folder.mkdir()
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"models": {
        "gone": {"backend": "openai", "options": {"model": "m", "api_key_file": str(tmp_path / "missing.key")}},
        "dir": {"backend": "cohere", "options": {"api_key_file": str(folder)}}}}))
    proc = run("config", "check", str(path), env=HOSTED_KEY_VARS)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert sorted(proc.stderr.splitlines()) == [
        f"{path}: models.dir.options.api_key_file: backend 'cohere': cannot read api_key_file "
        f"{str(folder)!r}: Is a directory",
        f"{path}: models.gone.options.api_key_file: backend 'openai': cannot read api_key_file "
        f"{str(tmp_path / 'missing.key')!r}: No such file or directory",
    ]


def test_config_check_fallback_into_another_vector_space(fake_conf):
    path = fake_conf({"a": {"backend": "fake", "options": {"dim": 8}, "fallbacks": ["b"]},
                      "b": {"backend": "fake", "options": {"dim": 16}}})
    proc = run("config", "check", str(path), cwd="/")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == [
        f"{path}: models.a.fallbacks.0: fallback b: backend.dim 16 \u2260 8 "
        f"(a fallback must embed into the same vector space)"]


def test_config_check_plugin_and_model_problems_together(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "wrongargs.py").write_text(
        "from vecshim import hookimpl\n\n@hookimpl\ndef register_backends(registry):\n    pass\n")
    (tmp_path / "plugins" / "crashes.py").write_text("raise ImportError('no module named acme')\n")
    path = tmp_path / "c.yaml"
    path.write_text("plugins: {dirs: [plugins, nowhere], entrypoints: false}\n"
                    "models:\n  m: {backend: sentence-transformers, options: {runtim: onnx}}\n")
    proc = run("config", "check", str(path))
    assert (proc.returncode, proc.stdout) == (2, "")
    lines = proc.stderr.splitlines()
    assert len(lines) == 4, lines
    assert any(line.startswith(f"{path}: plugins.dirs.0: plugin file ") and "crashes.py failed to import: "
               "ImportError: no module named acme" in line for line in lines)
    assert any(line.startswith(f"{path}: plugins.dirs.0: plugin 'wrongargs'") for line in lines)
    assert f"{path}: plugins.dirs.1: {tmp_path / 'nowhere'} is not a directory" in lines
    assert f"{path}: models.m.options.runtim: unknown key (did you mean 'runtime'?)" in lines
    assert_no_traceback(proc)


def test_serve_missing_hosted_key_exits_2_with_the_check_lines(tmp_path):
    path = tmp_path / "hosted.yaml"
    path.write_text("models:\n  o: {backend: openai, options: {model: text-embedding-3-small}}\n")
    check = run("config", "check", str(path), env=HOSTED_KEY_VARS)
    proc = run("serve", "--config", str(path), "--bind", "127.0.0.1:0", env=HOSTED_KEY_VARS, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == check.stderr.splitlines()
    assert "no API key" in proc.stderr
    assert "Booting worker" not in proc.stderr + proc.stdout
    assert_no_traceback(proc)


def test_serve_upstream_down_keeps_retrying_and_stays_unready(tmp_path):
    """A transient failure (nothing listens at base_url) is not a config error: serve stays up at 503."""
    path = tmp_path / "down.yaml"
    path.write_text("models:\n  o:\n    backend: openai\n    options: {model: m, base_url: 'http://127.0.0.1:9/v1'}\n"
                    "    retry: {max_attempts: 1}\n")
    assert run("config", "check", str(path), env=HOSTED_KEY_VARS).returncode == 0
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", **HOSTED_KEY_VARS)
    proc = subprocess.Popen([VECSHIM, "serve", "--config", str(path), "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/ready", timeout=5) as r:
                    status = r.status
            except urllib.error.HTTPError as err:
                status = err.code
                err.close()
                break
            except OSError:
                time.sleep(0.3)
        assert status == 503
        time.sleep(3)  # a retry or two later it is still running, still unready
        assert proc.poll() is None
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/ready", timeout=5)
        excinfo.value.close()
        assert excinfo.value.code == 503
    finally:
        stop_process(proc)


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
    opts = by_name["openai"]["options"]
    assert opts["model"] == {"type": "str", "required": True}
    assert opts["timeout_s"] == {"type": "float", "required": False, "default": 20.0}
    assert opts["api_key"] == {"type": "SecretStr | None", "required": False, "default": None}
    plugins = {p["name"]: p for p in out["plugins"]}
    assert plugins["vecshim.backends.local"] == {"name": "vecshim.backends.local", "version": __version__,
                                                 "hooks": ["register_backends"]}


def test_backends_with_config_plugin_dir(fake_conf):
    proc = run("backends", "--config", str(fake_conf()), cwd="/")
    assert proc.returncode == 0, proc.stderr
    heads = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert "fake  (plugin fakes_plugin)" in heads
    assert "sentence-transformers  (plugin vecshim.backends.local)" in heads


def test_backends_text_shows_option_types_and_defaults():
    proc = run("backends")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    block = lines[lines.index("openai  (plugin vecshim.backends.openai_api)") + 1:]
    block = block[:next((i for i, line in enumerate(block) if not line.startswith(" ")), len(block))]
    assert "    model: str  (required)" in block
    assert "    timeout_s: float  (default 20.0)" in block
    assert "    max_batch_size: int  (default 2048)" in block


def test_backends_json_into_head_ends_quietly():
    # `true` exits long before vecshim has imported anything, so its output meets a closed pipe.
    proc = subprocess.run(f"{VECSHIM} backends --json | true; echo \"rc=${{PIPESTATUS[0]}}\"", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert proc.stderr == ""
    assert proc.stdout.strip() == "rc=141"
    # And a reader that takes some of it first.
    proc = subprocess.run(f"{VECSHIM} backends --json | head -c 10", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=60)
    assert (proc.stdout, proc.stderr) == ('{\n  "backe', "")


def test_every_argument_has_help_and_every_command_an_example():
    from vecshim.cli import build_parser

    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")

    seen = []
    for name, parser in walk(build_parser(), "vecshim"):
        seen.append(name)
        assert parser.epilog and "example:\n  vecshim" in parser.epilog, name
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest}"
    assert {"vecshim serve", "vecshim config check", "vecshim backends", "vecshim embed",
            "vecshim plugin new"} <= set(seen)


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
    assert [r["text"] for r in rows] == ["first line", "", "second line"]
    assert rows[1] == {"text": "", "vector": None, "error": "blank line"}
    np.testing.assert_allclose(rows[2]["vector"], fake_vector("second line", "query", 16), rtol=1e-6)
    assert "1 line(s) had no text" in proc.stderr


def lines_of(n: int) -> list[str]:
    """n distinct texts of varied length, with blank lines mixed in."""
    return ["" if i % 97 == 13 else f"line {i} " + "word " * (i % 23) for i in range(n)]


def test_embed_output_is_line_aligned_float32_jsonl(fake_conf):
    texts = lines_of(2500)  # more than two chunks, so chunks overlap and reorder inside
    proc = run("embed", "-c", str(fake_conf()), input="".join(t + "\n" for t in texts))
    assert proc.returncode == 0, proc.stderr
    rows = vectors(proc.stdout)
    assert len(rows) == len(texts)
    for text, row in zip(texts, rows):
        assert row["text"] == text
        if not text:
            assert (row["vector"], row["error"]) == (None, "blank line")
            continue
        # float32 written in its shortest exact form: parsing gives back the very same float32 numbers.
        got = np.asarray(row["vector"], dtype=np.float32)
        assert np.array_equal(got, fake_vector(text, "passage", 8))
    assert proc.stdout.count(", ") == 0  # compact


def test_embed_jsonl_input_keeps_ids_and_flags_bad_lines(fake_conf, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"doc": 7, "body": "alpha"}\n'
                      '\n'
                      'not json\n'
                      '{"doc": "x-9", "title": "no body"}\n'
                      '{"doc": null, "body": "beta"}\n')
    proc = run("embed", "-c", str(fake_conf()), "--input", str(source), "--input-format", "jsonl",
               "--text-field", "body", "--id-field", "doc")
    assert proc.returncode == 0, proc.stderr
    rows = vectors(proc.stdout)
    assert [r["doc"] for r in rows] == [7, None, None, "x-9", None]
    assert np.array_equal(np.float32(rows[0]["vector"]), fake_vector("alpha", "passage", 8))
    assert np.array_equal(np.float32(rows[4]["vector"]), fake_vector("beta", "passage", 8))
    assert rows[1]["error"] == "blank line"
    assert rows[2]["error"].startswith("invalid JSON")
    assert rows[3]["error"] == "no non-empty string field 'body'"
    assert [r["vector"] is None for r in rows] == [False, True, True, True, False]


def test_embed_npy_round_trips_float32_rows_in_line_order(fake_conf, tmp_path):
    texts = lines_of(1500)
    out = tmp_path / "v.npy"
    proc = run("embed", "-c", str(fake_conf()), "--format", "npy", "-o", str(out),
               input="".join(t + "\n" for t in texts))
    assert proc.returncode == 0, proc.stderr
    matrix = np.load(out)
    assert (matrix.dtype, matrix.shape) == (np.dtype("<f4"), (len(texts), 8))
    for text, row in zip(texts, matrix):
        if text:
            assert np.array_equal(row, fake_vector(text, "passage", 8))
        else:
            assert np.isnan(row).all()
    # To a pipe (not seekable) the same matrix arrives.
    piped = subprocess.run([VECSHIM, "embed", "-c", str(fake_conf()), "--format", "npy"], capture_output=True,
                           input="".join(t + "\n" for t in texts).encode(), timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(TESTS), HF_HUB_OFFLINE="1"))
    assert piped.returncode == 0, piped.stderr
    assert np.array_equal(np.load(io.BytesIO(piped.stdout)), matrix, equal_nan=True)


def test_embed_parquet_keeps_lines_ids_and_float32(fake_conf, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")  # the parquet extra; `make setup` installs it
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 7, "text": "alpha"}\n\n{"id": "x-9", "text": "beta gamma"}\n')
    out = tmp_path / "v.parquet"
    proc = run("embed", "-c", str(fake_conf()), "--input", str(source), "--input-format", "jsonl",
               "--format", "parquet", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    assert str(table.schema.field("vector").type) == "fixed_size_list<element: float>[8]"
    rows = table.to_pylist()
    assert [(r["line"], r["id"], r["error"]) for r in rows] == [(1, "7", None), (2, None, "blank line"),
                                                              (3, "x-9", None)]
    assert rows[1]["vector"] is None
    assert np.array_equal(np.asarray(rows[2]["vector"], dtype=np.float32), fake_vector("beta gamma", "passage", 8))


def test_embed_a_failing_text_fails_only_its_own_line(fake_conf):
    path = fake_conf({"f": {"backend": "fake", "options": {"fail_on": "poison"}}})
    texts = ["ok one", "a poison pill", "ok two"]
    proc = run("embed", "-c", str(path), input="".join(t + "\n" for t in texts))
    assert proc.returncode == 1
    rows = vectors(proc.stdout)
    assert [r["text"] for r in rows] == texts
    assert rows[1]["vector"] is None and "refuses texts containing 'poison'" in rows[1]["error"]
    assert np.array_equal(np.float32(rows[0]["vector"]), fake_vector("ok one", "passage", 16))
    assert np.array_equal(np.float32(rows[2]["vector"]), fake_vector("ok two", "passage", 16))
    assert "error: 1 line(s) could not be embedded" in proc.stderr
    assert_no_traceback(proc)


#: Prefix for a command that must get SIGINT's default action whatever this process inherited: a
#: background job of a non-interactive shell (`sh -c 'make test & ...'`) starts with SIGINT ignored,
#: its children inherit that, and Python keeps an inherited SIG_IGN, as a shell's background job
#: should. Run so, the Ctrl-C test below saw SIGINT do nothing and embed end with 0 every time.
DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])"]


def test_embed_ctrl_c_ends_cleanly(fake_conf, tmp_path):
    # 20,000 texts at 20 ms a backend call take about 12 s; the first chunk is out after about 1 s.
    # Nothing reads stdout between the first line and SIGINT, so embed blocks on the full pipe
    # there: it is still running when the signal comes, however slow this machine is.
    path = fake_conf({"slow": {"backend": "fake", "options": {"delay_s": 0.02}}})
    source = tmp_path / "in.txt"
    source.write_text("".join(f"text {i}\n" for i in range(20000)))
    # bufsize=0: readline takes only the first line, so `out` holds every other line written.
    proc = subprocess.Popen([*DEFAULT_SIGINT, VECSHIM, "embed", "-c", str(path), "--input", str(source)],
                            bufsize=0, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(TESTS), HF_HUB_OFFLINE="1"))
    try:
        first = proc.stdout.readline()  # embedding is under way
        assert first.startswith(b'{"text":"text 0"')
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, err.decode()[-2000:])
    assert err.decode().splitlines()[-1] == "interrupted"
    assert b"Traceback" not in err
    assert 1 + len(out.splitlines()) < 20000  # it stopped early


def test_embed_into_a_closed_pipe_ends_quietly(fake_conf):
    proc = subprocess.run(f"yes hello | head -n 5000 | {VECSHIM} embed -c {fake_conf()} | head -n 2 >/dev/null; "
                          f"echo \"rc=${{PIPESTATUS[2]}}\"", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(TESTS), HF_HUB_OFFLINE="1"))
    assert proc.stdout.strip() == "rc=141"
    assert proc.stderr == ""


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
