"""`required: false` models: one that cannot start never holds the server out of ready.

Real app over real HTTP (FakeBackend for the required model, the real `openai`
backend for the optional one, which never gets far enough to call anything).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vecshim.config import parse_config
from vecshim.errors import ConfigError

VENV_BIN = Path(sys.executable).parent
KEY_VAR = "VECSHIM_TEST_OPTIONAL_KEY"


def optional_config(api_key: str = "${%s}" % KEY_VAR, backend: str = "openai", **model) -> dict:
    return {
        "default_model": "fake",
        "models": {
            "fake": {"backend": "fake", "options": {"dim": 8}},
            "hosted": {"backend": backend, "required": False,
                       "options": {"model": "text-embedding-3-small", "api_key": api_key}, **model},
        },
        "cache": {"enabled": False},
    }


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def get(served, path: str) -> tuple[int, dict, bytes]:
    r = served.client().request("GET", path)
    return r.status, r.headers, r.body


def post_json(served, path: str, payload: dict) -> tuple[int, dict, bytes]:
    r = served.client().request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    return r.status, r.headers, r.body


# ----------------------------------------------------------------- config ----

def test_unset_var_makes_an_optional_model_unavailable_not_the_config_invalid():
    cfg = parse_config(optional_config(), {})
    assert cfg.models["hosted"].required is False
    assert set(cfg.unavailable) == {"hosted"}
    assert KEY_VAR in cfg.unavailable["hosted"] and "models.hosted.options.api_key" in cfg.unavailable["hosted"]
    # with the variable set, nothing is unavailable and the value is expanded
    cfg = parse_config(optional_config(), {KEY_VAR: "sk-test-1234"})
    assert cfg.unavailable == {}
    assert cfg.models["hosted"].options["api_key"] == "sk-test-1234"


@pytest.mark.parametrize("spelling", [False, "false", "no"])
def test_required_false_is_recognised_in_every_spelling_pydantic_accepts(spelling):
    data = optional_config()
    data["models"]["hosted"]["required"] = spelling
    cfg = parse_config(data, {})
    assert cfg.models["hosted"].required is False and set(cfg.unavailable) == {"hosted"}


def test_unset_var_of_a_required_model_is_still_a_config_error():
    data = optional_config()
    del data["models"]["hosted"]["required"]
    with pytest.raises(ConfigError, match=KEY_VAR):
        parse_config(data, {})
    # and an unset var outside the optional model's section too
    data = optional_config()
    data["cache"]["redis_url"] = "${VECSHIM_TEST_UNSET_REDIS}"
    with pytest.raises(ConfigError, match="VECSHIM_TEST_UNSET_REDIS"):
        parse_config(data, {})


def test_dollar_escapes_expand_once_in_optional_models():
    cfg = parse_config(optional_config(api_key="a$$b"), {})
    assert cfg.models["hosted"].options["api_key"] == "a$b" and cfg.unavailable == {}


def test_the_default_model_must_be_required():
    data = optional_config()
    data["default_model"] = "hosted"
    with pytest.raises(ConfigError, match=r"models\.hosted\.required"):
        parse_config(data, {KEY_VAR: "x" * 8})


# ----------------------------------------------------------------- served ----

def test_replica_is_ready_while_an_optional_model_lacks_its_key(serve):
    s = serve(optional_config())
    status, _, _ = get(s, "/.well-known/ready")
    assert status == 204
    # the rest serve
    status, _, body = post_json(s, "/vectors", {"text": "hello"})
    assert status == 200 and len(json.loads(body)["vector"]) == 8
    # the optional model's own routes: JSON 503 naming the reason
    for path in ("/models/hosted/vectors", "/models/hosted/.well-known/ready"):
        status, headers, body = (post_json(s, path, {"text": "hello"}) if path.endswith("vectors")
                                 else get(s, path))
        assert status == 503, path
        assert headers["content-type"].startswith("application/json"), path
        assert KEY_VAR in json.loads(body)["error"], path
    status, _, body = post_json(s, "/v1/embeddings", {"model": "hosted", "input": "hello"})
    assert status == 503 and b"<html" not in body.lower()
    # /meta shows the state and the reason
    meta = json.loads(get(s, "/meta")[2])
    hosted = meta["models"]["hosted"]
    assert hosted["state"] == "unavailable" and hosted["required"] is False
    assert KEY_VAR in hosted["error"]
    assert meta["models"]["fake"]["state"] == "ready" and meta["models"]["fake"]["required"] is True


def test_an_optional_model_that_fails_to_load_does_not_hold_ready(serve):
    # `${VAR:-}` expands to "": the config is complete, but the backend's load() fails (no key).
    s = serve(optional_config(api_key="${%s:-}" % KEY_VAR))
    assert get(s, "/.well-known/ready")[0] == 204
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hosted = json.loads(get(s, "/meta")[2])["models"]["hosted"]
        if hosted["state"] == "failed":
            break
        time.sleep(0.1)
    assert hosted["state"] == "failed" and "API key" in hosted["error"]
    status, headers, body = post_json(s, "/models/hosted/vectors", {"text": "x"})
    assert status == 503 and "API key" in json.loads(body)["error"]


def test_an_optional_model_with_an_unknown_backend_is_unavailable(serve):
    s = serve(optional_config(api_key="literal-key", backend="no-such-backend"))
    assert get(s, "/.well-known/ready")[0] == 204
    hosted = json.loads(get(s, "/meta")[2])["models"]["hosted"]
    assert hosted["state"] == "unavailable" and "no-such-backend" in hosted["error"]
    assert hosted["backend"] == "no-such-backend"


def test_a_required_model_that_cannot_start_still_holds_ready(serve):
    data = optional_config(api_key="${%s:-}" % KEY_VAR)
    data["models"]["hosted"]["required"] = True
    s = serve(data, wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and s.state.models["fake"].state != "ready":
        time.sleep(0.05)
    status, _, body = get(s, "/.well-known/ready")
    assert status == 503 and "hosted" in json.loads(body)["error"]


def test_secret_values_stay_out_of_meta_and_errors(serve, monkeypatch):
    # a set key, rejected nowhere (no network call happens before a request); it must not leak
    secret = "sk-optional-secret-0123456789"
    data = optional_config()
    data["models"]["hosted"]["backend"] = "no-such-backend"
    monkeypatch.setenv(KEY_VAR, secret)
    s = serve(data)
    for path in ("/meta", "/models/hosted/meta"):
        assert secret.encode() not in get(s, path)[2]
    assert secret.encode() not in post_json(s, "/models/hosted/vectors", {"text": "x"})[2]


# -------------------------------------------------------------------- CLI ----

def test_config_check_warns_and_passes_for_an_unavailable_optional_model(tmp_path):
    data = optional_config()
    data["models"] = {"minilm": {"backend": "sentence-transformers"}, "hosted": data["models"]["hosted"]}
    data["default_model"] = "minilm"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k not in (KEY_VAR, "OPENAI_API_KEY")}
    out = subprocess.run([str(VENV_BIN / "vecshim"), "config", "check", str(path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hosted" in out.stderr and KEY_VAR in out.stderr
    # the same model marked required is an error
    data["models"]["hosted"]["required"] = True
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run([str(VENV_BIN / "vecshim"), "config", "check", str(path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and KEY_VAR in out.stderr


def test_an_optional_model_whose_key_is_rejected_does_not_hold_ready(serve):
    """A set but wrong key: the warm-up call gets OpenAI's 401, the model is `failed`, the rest serve."""
    from tests.fakes.openai_upstream import FakeOpenAI

    wrong = "sk-wrong-key-0123456789"
    with FakeOpenAI(dim=8, api_key="sk-right-key-0123456789") as fake:
        data = optional_config(api_key=wrong)
        data["models"]["hosted"]["options"]["base_url"] = fake.url + "/v1"
        s = serve(data)
        assert get(s, "/.well-known/ready")[0] == 204
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            hosted = json.loads(get(s, "/meta")[2])["models"]["hosted"]
            if hosted["state"] == "failed":
                break
            time.sleep(0.1)
        assert hosted["state"] == "failed" and "401" in hosted["error"], hosted
        assert any(r.path.endswith("/embeddings") for r in fake.requests)  # it really called upstream
        status, _, body = post_json(s, "/models/hosted/vectors", {"text": "x"})
        assert status == 503 and wrong.encode() not in body
        assert wrong.encode() not in get(s, "/meta")[2]


def test_an_unavailable_optional_fallback_is_dropped_not_fatal(serve):
    data = optional_config()
    data["models"]["fake"]["fallbacks"] = ["hosted"]
    s = serve(data)
    assert get(s, "/.well-known/ready")[0] == 204
    assert s.state.models["fake"].fallbacks == []
    assert post_json(s, "/vectors", {"text": "hello"})[0] == 200
    meta = json.loads(get(s, "/meta")[2])["models"]["fake"]
    assert meta["fallbacks"] == [] and meta["fallbacks_dropped"][0]["name"] == "hosted"
    assert meta["fallbacks_dropped"][0]["reason"].startswith("unavailable: ")
