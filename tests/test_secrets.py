"""Secrets never leave vecshim: not in /meta, logs, error bodies, metrics, tracebacks or CLI output.

Every kind of secret is configured at once (an OpenAI key via `${VAR}`, an
OpenAI key only in $OPENAI_API_KEY, a Cohere key in a key file, bearer tokens
for the embed and metrics routes, a Redis password in the URL, a plugin's
`token` option), then success and failure paths are driven: wrong tokens,
upstream errors that echo the key, a plugin exception quoting its token,
Redis going away, DEBUG logging with tracebacks. Everything captured (logs
through caplog and the real stderr, every reply body and header, /meta,
/metrics, the CLI, a real gunicorn's log file) is searched for each secret.
The keys are shaped so that vecshim's key-pattern redaction (`sk-...`)
does not catch them: only exact-value redaction can.
"""
from __future__ import annotations

import ast
import hmac
import inspect
import json
import logging
import os
import socket
import subprocess
import textwrap
import time

import pytest
import yaml

from conftest import VENV_BIN
from goclient import GoClient, go_json, vec_request
from redisserver import RedisServer
from test_production import start, stop
from tests.fakes import status
from tests.fakes.cohere_upstream import FakeCohere
from tests.fakes.openai_upstream import FakeOpenAI
from vecshim.api import common

OPENAI_KEY = "zz9Plural-OPENAI-secret-4242aa"
ENV_ONLY_KEY = "zz9Plural-ENVONLY-secret-5511bb"
COHERE_KEY = "zz9Plural-COHERE-secret-7788cc"
EMBED_TOKEN = "zz9Plural-EMBEDTOK-secret-9931dd"
METRICS_TOKEN = "zz9Plural-METRICSTOK-secret-1234ee"
REDIS_PASSWORD = "zz9Plural-REDISPW-secret-6060ff"
PLUGIN_TOKEN = "zz9Plural-PLUGINTOK-secret-3141gg"
SECRETS = [OPENAI_KEY, ENV_ONLY_KEY, COHERE_KEY, EMBED_TOKEN, METRICS_TOKEN, REDIS_PASSWORD, PLUGIN_TOKEN]

LEAKY_PLUGIN = '''
import logging
import numpy as np
from vecshim import Backend, BackendOptions, hookimpl

log = logging.getLogger("leaky_plugin")


class LeakyOptions(BackendOptions):
    token: str


class Leaky(Backend):
    """A careless plugin: logs its token at DEBUG and quotes it in exceptions."""

    name = "leaky"
    Options = LeakyOptions

    def info(self):
        return {"model": "ones-4d"}

    def embed(self, texts, task):
        log.debug("calling home with token %s", self.options.token)
        if any("LEAK" in t for t in texts):
            raise RuntimeError(f"upstream refused token {self.options.token}")
        return np.ones((len(texts), 4), dtype=np.float32)


@hookimpl
def register_backends(register):
    register(Leaky)
'''


class EchoingOpenAI(FakeOpenAI):
    """Echoes the presented key in every error message, worse than any real provider."""

    def error_body(self, status, message, code=None):
        key = getattr(self, "_presented", "")
        return super().error_body(status, f"{message} (request made with key {key})", code)

    def _respond(self, handler, request):
        self._presented = self.credentials(request)
        super()._respond(handler, request)


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked in {where}"
        core = secret.split("-")[1]  # a distinctive inner part: no partial echo either
        assert core not in text, f"part of {secret} leaked in {where}"


def write_plugin(folder) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "leaky.py").write_text(LEAKY_PLUGIN)
    return str(folder)


def secrets_config(openai_url: str, cohere_url: str, key_file, redis_url: str, plugin_dir: str) -> dict:
    fast = {"max_attempts": 2, "budget_s": 1.0, "base_delay_s": 0.01, "max_delay_s": 0.05}
    return {
        "models": {
            "oai": {"backend": "openai", "retry": fast,
                    "options": {"model": "text-embedding-3-small", "base_url": openai_url + "/v1",
                                "api_key": "${VECSHIM_SECRET_OPENAI}", "timeout_s": 2}},
            "oai-env": {"backend": "openai", "retry": fast,  # key from $OPENAI_API_KEY only: wrong upstream
                        "options": {"model": "text-embedding-3-small", "base_url": openai_url + "/v1",
                                    "timeout_s": 2}},
            "co": {"backend": "cohere", "retry": fast,
                   "options": {"base_url": cohere_url, "api_key_file": str(key_file), "timeout_s": 2}},
            "leaky": {"backend": "leaky", "options": {"token": "${VECSHIM_SECRET_PLUGIN}"}},
        },
        "default_model": "oai",
        "cache": {"memory_items": 0, "redis_url": redis_url},
        "plugins": {"dirs": [plugin_dir], "entrypoints": False},
        "server": {"auth": {"embed_tokens": [EMBED_TOKEN], "metrics_tokens": [METRICS_TOKEN]}},
        "logging": {"level": "DEBUG", "format": "json"},
    }


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("VECSHIM_SECRET_OPENAI", OPENAI_KEY)
    monkeypatch.setenv("VECSHIM_SECRET_PLUGIN", PLUGIN_TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", ENV_ONLY_KEY)
    monkeypatch.setenv("VECSHIM_SECRET_REDIS_PW", REDIS_PASSWORD)


@pytest.fixture
def redis_with_password():
    """redis-server with `--requirepass` (RedisServer has no password option), stopped by PID."""
    server = RedisServer()
    server.proc = subprocess.Popen([server.exe, "--port", str(server.port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--requirepass", REDIS_PASSWORD],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    yield server
    server.stop()


def drive(port: int, seen: list[str], fail_upstream) -> dict:
    """Success and failure paths on every route group; every reply (headers and body) goes to `seen`."""
    c = GoClient("127.0.0.1", port)
    auth = {"Authorization": f"Bearer {EMBED_TOKEN}"}
    replies = {}

    def req(name, method, path, body=None, headers=None):
        r = c.request(method, path, body, headers)
        seen.append(f"{name}: {r.status} {json.dumps(r.headers)} {r.body.decode(errors='replace')}")
        replies[name] = r
        return r

    req("ok", "POST", "/vectors", vec_request("a plain text"), auth)
    req("ok_cohere", "POST", "/models/co/vectors", vec_request("a cohere text", task_type="query"), auth)
    req("ok_leaky", "POST", "/models/leaky/vectors", vec_request("harmless"), auth)
    req("no_token", "POST", "/vectors", vec_request("x"))
    for i, bad in enumerate([EMBED_TOKEN[:-1], EMBED_TOKEN + "x", EMBED_TOKEN.upper(), METRICS_TOKEN]):
        req(f"bad_token_{i}", "POST", "/vectors", vec_request("x"), {"Authorization": f"Bearer {bad}"})
    fail_upstream()
    req("upstream_500", "POST", "/vectors", vec_request("upstream fails"), auth)
    req("env_key_401", "POST", "/models/oai-env/vectors", vec_request("wrong key"), auth)
    req("plugin_raises", "POST", "/models/leaky/vectors", vec_request("please LEAK it"), auth)
    req("openai_route", "POST", "/v1/embeddings", go_json({"input": ["a", "b"], "model": "co"}), auth)
    req("openai_bad", "POST", "/v1/embeddings", go_json({"input": [1], "model": "leaky"}), auth)
    req("meta", "GET", "/meta")
    for name in ("oai", "oai-env", "co", "leaky"):
        req(f"meta_{name}", "GET", f"/models/{name}/meta")
    req("metrics_denied", "GET", "/metrics", headers=auth)
    req("metrics", "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    req("models", "GET", "/v1/models", headers=auth)
    req("ready", "GET", "/.well-known/ready")
    req("openapi", "GET", "/openapi.json")
    c.close()
    return replies


def check_replies(replies: dict) -> None:
    assert replies["ok"].status == 200 and replies["ok_cohere"].status == 200 and replies["ok_leaky"].status == 200
    assert replies["no_token"].status == 401
    assert all(replies[f"bad_token_{i}"].status == 401 for i in range(4))
    assert replies["upstream_500"].status == 502 and "500" in replies["upstream_500"].json()["error"]
    assert replies["env_key_401"].status == 503  # failed to load: authentication failed
    assert replies["plugin_raises"].status == 502
    assert replies["metrics_denied"].status == 401 and replies["metrics"].status == 200
    assert replies["openai_route"].status == 200


def test_no_secret_anywhere_in_process(serve, secret_env, redis_with_password, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "cohere.key"
    key_file.write_text(COHERE_KEY + "\n")
    seen: list[str] = []
    with EchoingOpenAI(dim=8, api_key=OPENAI_KEY) as oai, FakeCohere(dim=8, api_key=COHERE_KEY) as co:
        redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_with_password.port}/0"
        cfg = secrets_config(oai.url, co.url, key_file, redis_url, write_plugin(tmp_path / "plugins"))
        s = serve(cfg, wait=False)
        for name in ("oai", "co", "leaky"):
            assert s.state.models[name]._ready.wait(20), s.state.models[name].error
        deadline = time.monotonic() + 10
        while s.state.models["oai-env"].state != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        replies = drive(s.port, seen, lambda: oai.inject(status(500), times=2))
        check_replies(replies)
        assert s.state.cache.redis.errors == 0, "the password must work"
        # Redis goes away: its errors are logged, without the URL.
        redis_with_password.stop()
        c = GoClient("127.0.0.1", s.port)
        r = c.request("POST", "/vectors", vec_request("redis is gone"), {"Authorization": f"Bearer {EMBED_TOKEN}"})
        seen.append(r.body.decode())
        assert r.status == 200 and s.state.cache.redis.errors >= 1
        c.close()
    formatter = next(h.formatter for h in logging.getLogger().handlers if getattr(h, "_vecshim_handler", False))
    formatted = [formatter.format(rec) for rec in caplog.records]
    out, err = capfd.readouterr()
    everything = "\n".join(seen + formatted + [out, err])
    # The paths that could leak really ran and were logged.
    assert "upstream refused token" in everything and "Traceback" in everything
    assert "redis cache unavailable" in everything and "calling home with token ***" in everything
    assert "authentication failed" in everything
    assert_no_secret(everything, "replies and logs")


def test_cli_output_never_shows_secrets(secret_env, tmp_path):
    key_file = tmp_path / "cohere.key"
    key_file.write_text(COHERE_KEY)
    cfg = secrets_config("http://127.0.0.1:9", "http://127.0.0.1:9", key_file,
                         "redis://:${VECSHIM_SECRET_REDIS_PW}@127.0.0.1:9/0", write_plugin(tmp_path / "plugins"))
    path = tmp_path / "vecshim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    bad = dict(cfg)
    bad["models"] = dict(cfg["models"], oai={**cfg["models"]["oai"], "options": {
        **cfg["models"]["oai"]["options"], "api_key": OPENAI_KEY, "nonsense": PLUGIN_TOKEN}})
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    outputs = []
    for args, want in ((["config", "check", str(path)], 0), (["backends", "--json", "--config", str(path)], 0),
                       (["backends", "--config", str(path)], 0), (["config", "check", str(bad_path)], 2)):
        p = subprocess.run([str(VENV_BIN / "vecshim"), *args], capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode == want, (args, p.stdout, p.stderr)
        outputs.append(f"{args}: {p.stdout} {p.stderr}")
    assert "models.oai.options.nonsense" in outputs[-1]  # the error names the key, not its value
    assert_no_secret("\n".join(outputs), "CLI output")


@pytest.mark.slow
def test_no_secret_in_a_real_gunicorn_log(secret_env, redis_with_password, tmp_path):
    key_file = tmp_path / "cohere.key"
    key_file.write_text(COHERE_KEY)
    seen: list[str] = []
    with EchoingOpenAI(dim=8, api_key=OPENAI_KEY) as oai, FakeCohere(dim=8, api_key=COHERE_KEY) as co:
        redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_with_password.port}/0"
        cfg = secrets_config(oai.url, co.url, key_file, redis_url, write_plugin(tmp_path / "plugins"))
        cfg.pop("plugins")  # start() adds the plugins folder (with our leaky.py in it)
        proc = start(tmp_path, cfg, ready=False)
        try:
            from conftest import wait_http
            wait_http(f"http://127.0.0.1:{proc.port}/models/leaky/.well-known/ready", 60, proc=proc)
            wait_http(f"http://127.0.0.1:{proc.port}/models/co/.well-known/ready", 30, proc=proc)
            wait_http(f"http://127.0.0.1:{proc.port}/models/oai/.well-known/ready", 30, proc=proc)
            time.sleep(0.5)  # oai-env has had its first failed load
            check_replies(drive(proc.port, seen, lambda: oai.inject(status(500), times=2)))
        finally:
            stop(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "upstream refused token ***" in log and "Traceback" in log and "authentication failed" in log
    assert_no_secret(log + "\n".join(seen), "gunicorn log and replies")


# -- bearer tokens: behaviour and constant-time comparison --------------------------------

def test_bearer_tokens_accept_exactly_the_token(serve):
    from conftest import fake_config
    tokens = ["tok-alpha-0123456789", "tok-beta-9876543210"]
    cfg = fake_config(dim=8)
    cfg["server"] = {"auth": {"embed_tokens": tokens}}
    s = serve(cfg)
    c = s.client()

    def status_with(header):
        return c.request("POST", "/vectors", vec_request("x"), {"Authorization": header} if header else None).status

    for t in tokens:
        assert status_with(f"Bearer {t}") == 200
        assert status_with(f"bearer {t}") == 200  # the scheme is case-insensitive (RFC 7235)
    rejected = [None, "", "Bearer", "Bearer ", tokens[0], f"Basic {tokens[0]}", f"Bearer {tokens[0][:-1]}",
                f"Bearer {tokens[0]}x", f"Bearer x{tokens[0]}", f"Bearer {tokens[0].upper()}",
                f"Bearer {tokens[0][1:]}", f"Bearer {tokens[0]},{tokens[1]}", f"Bearer {tokens[0]}{tokens[1]}",
                "Bearer tok-alpha-012345678\u00e9"]
    for header in rejected:
        if header is not None and not header.isascii():
            continue  # http.client refuses non-latin-1; covered by the fuzz tests
        r = c.request("POST", "/vectors", vec_request("x"), {"Authorization": header} if header is not None else None)
        assert r.status == 401, header
        assert r.json() == {"error": "missing or invalid bearer token"}
        assert r.headers["www-authenticate"] == 'Bearer realm="vecshim"'
    c.close()


def test_token_comparison_is_constant_time_by_construction():
    """Checked by reading the code, not by timing it.

    A timing test of one string comparison over loopback HTTP is dominated by
    scheduler noise on a shared 2-core machine and would be flaky, so this
    test asserts instead that `check_bearer` compares with
    `hmac.compare_digest` and that it compares the presented token against
    every configured token (no early exit revealing which matched).
    """
    source = textwrap.dedent(inspect.getsource(common.check_bearer))
    assert "hmac.compare_digest(" in source
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):  # no ==, != or `in` touches a token
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"given", "token", "tokens", "header"}, ast.unparse(node)
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.For))
    assert ast.unparse(loop.iter) == "tokens"
    assert not any(isinstance(n, (ast.Break, ast.Return, ast.Raise)) for n in ast.walk(loop)), \
        "the loop must visit every token"
    assert common.hmac is hmac
