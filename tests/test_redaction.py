"""One redaction point: every secret the process knows, in every form an upstream may echo it.

The end-to-end test runs a real `vecshim serve` against fake OpenAI and
Cohere upstreams on 127.0.0.1 that echo the presented key in each error:
plain, partly masked ("Zq7Xv9Lm****5Fg0"), URL-encoded, base64 and
JSON-escaped. Keys come from an environment variable the SDK reads, from a
key file, from the config, and as a password inside a `base_url`. No
secret, nor any of those forms, nor its first 8 characters may appear in
any log line, reply, /meta or /metrics.
"""
from __future__ import annotations

import base64
import json
import logging
from urllib.parse import quote

import pytest

from goclient import GoClient, go_json, vec_request
from test_production import start, stop
from tests.fakes import status
from tests.fakes.cohere_upstream import FakeCohere
from tests.fakes.openai_upstream import FakeOpenAI
from vecshim.backends._hosted import MAX_DETAIL, redact, upstream_detail
from vecshim.logs import register_secret
from vecshim.logs import redact as redact_known

# Shaped like real keys ('/', '+', '=' make every encoding differ) and not like `sk-...`,
# so only the redaction list, not the key-pattern fallback, can catch them.
ENV_KEY = "Zq7Xv9Lm/Env+Key=8f3Kd9Qw5Fg0Sa"
FILE_KEY = "Co9Hx2Lp/File+Key=4d7Rz1Vb8Nm3Tt"
CONFIG_KEY = "Cf5Kk2Wd/Conf+Key=2j8Wq6Ee0PpYy"
URL_PASSWORD = "Ur1Pw9xQ/Url+Pw=3mQz7Hs2Bv"
SECRETS = [ENV_KEY, FILE_KEY, CONFIG_KEY, URL_PASSWORD]


def leaked_forms(secret: str) -> dict[str, str]:
    """What of a secret must never be seen: itself, encoded, or its first 8 characters."""
    b64 = base64.b64encode(secret.encode()).decode()
    return {"plain": secret, "prefix": secret[:8], "url": quote(secret, safe=""),
            "base64": b64[:len(secret) // 3 * 4], "json": json.dumps(secret)[1:-1].replace("/", "\\/")}


def assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        for form, value in leaked_forms(secret).items():
            assert value not in text, f"{form} form of {secret!r} leaked in {where}"


# -- the redaction function -------------------------------------------------------------

def test_every_encoding_of_a_registered_secret_is_redacted():
    key = "Rd4Tq8Mz/Unit+Key=7Lp2Xc5Vn0Bb"
    register_secret(key)
    masked = f"{key[:8]}****{key[-4:]}"
    text = (f"plain {key} masked {masked} url {quote(key, safe='')} b64 {base64.b64encode(key.encode()).decode()} "
            f"basic {base64.b64encode(('user:' + key).encode()).decode()} json {json.dumps(key).replace('/', '/')} "
            f"cut {key[:11]}")
    out = redact_known(text)
    for form in (key, key[:8], quote(key, safe=""), key[-4:] + " ", "****"):
        assert form not in out, (form, out)
    assert out.startswith("plain *** masked *** url ***") and "ordinary" == redact_known("ordinary")


def test_redaction_happens_before_truncation():
    key = "Tr5Uv8Wx/Trunc+Key=1Ab2Cd3Ef4Gh"
    # The key straddles the cut: truncating first would leave its first characters unrecognised.
    text = "x" * (MAX_DETAIL - 11) + key + " and more"
    out = redact(text, key)
    assert key[:8] not in out and key[:4] not in out[-20:]
    assert len(out) <= MAX_DETAIL + 3


def test_an_upstream_error_text_goes_to_the_log_never_to_the_client(caplog):
    caplog.set_level(logging.WARNING, "vecshim.upstream")
    key = "Up6Qr3St/Detail+Key=9Zx8Yw7Vu"
    message = upstream_detail("openai", 404, f"The model `m` does not exist (key {key})", key)
    assert message == "model or route not found upstream"
    assert "does not exist (key [redacted])" in caplog.text and key not in caplog.text


# -- a real server with echoing upstreams ---------------------------------------------------

class EchoOpenAI(FakeOpenAI):
    echo_key = True


class EchoCohere(FakeCohere):
    echo_key = True


@pytest.mark.slow
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_no_secret_in_logs_replies_meta_or_metrics(tmp_path, monkeypatch, level):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("VECSHIM_TEST_CONFIG_KEY", CONFIG_KEY)
    key_file = tmp_path / "cohere.key"
    key_file.write_text(FILE_KEY + "\n")
    once = {"max_attempts": 1}
    with EchoOpenAI(dim=8, api_key=ENV_KEY) as env_up, EchoOpenAI(dim=8, api_key=CONFIG_KEY) as cfg_up, \
            EchoCohere(dim=8, api_key=FILE_KEY) as co_up:
        url_with_password = f"http://svc:{quote(URL_PASSWORD, safe='')}@127.0.0.1:{env_up.url.rsplit(':', 1)[1]}/v1"
        cfg = {
            "models": {
                "oai-env": {"backend": "openai", "retry": once,
                            "options": {"model": "text-embedding-3-small", "base_url": env_up.url + "/v1"}},
                "oai-cfg": {"backend": "openai", "retry": once,
                            "options": {"model": "text-embedding-3-small", "base_url": cfg_up.url + "/v1",
                                        "api_key": "${VECSHIM_TEST_CONFIG_KEY}"}},
                "co-file": {"backend": "cohere", "retry": once,
                            "options": {"base_url": co_up.url, "api_key_file": str(key_file)}},
                "oai-url": {"backend": "openai", "retry": once, "required": False,
                            "options": {"model": "text-embedding-3-small", "base_url": url_with_password}},
            },
            "default_model": "oai-env",
            "cache": {"enabled": False},
            "logging": {"level": level, "format": "json" if level == "DEBUG" else "text"},
        }
        proc = start(tmp_path, cfg)
        seen = []
        try:
            c = GoClient("127.0.0.1", proc.port)
            for model, upstream in (("oai-env", env_up), ("oai-cfg", cfg_up), ("co-file", co_up)):
                assert c.request("POST", f"/models/{model}/vectors", vec_request("fine")).status == 200
                for code in (400, 404, 422, 500):
                    upstream.inject(status(code))
                    r = c.request("POST", f"/models/{model}/vectors", vec_request(f"fails {code}"))
                    seen.append(r.body.decode())
                    assert r.status == 502 and f"returned {code}" in r.json()["error"], r.body
                upstream.inject(status(400))
                r = c.request("POST", "/v1/embeddings", go_json({"input": ["x"], "model": model}))
                seen.append(r.body.decode())
                assert r.status == 502
            r = c.request("POST", "/models/oai-url/vectors", vec_request("through a URL with a password"))
            seen.append(r.body.decode())
            for path in ("/meta", "/models/oai-url/meta", "/metrics", "/v1/models"):
                r = c.request("GET", path)
                seen.append(f"{path} {r.status} {json.dumps(r.headers)} {r.body.decode()}")
            c.close()
        finally:
            stop(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    # The leaky paths ran: upstream error texts reached the log (redacted), not the replies.
    assert "upstream returned 422" in log and "injected 422" in log
    assert not any("injected" in s for s in seen)
    if level == "DEBUG":
        assert "HTTP Request: POST" in log  # the HTTP client's request lines, redacted
    else:
        assert "HTTP Request:" not in log  # off unless logging.level is DEBUG
    assert_clean(log, f"the server log at {level}")
    assert_clean("\n".join(seen), "replies, /meta and /metrics")


def test_credentials_in_config_urls_and_sdk_env_keys_are_redacted_in_log_lines(monkeypatch):
    from vecshim.config import parse_config
    from vecshim.logs import VecshimFormatter, configure_logging

    password, env_key = "Pw7Lk2Qx/Url+Cfg=5Hn8", "Ev3Jd8Kw/SdkEnv+Key=1Mz6Rt"
    monkeypatch.setenv("CO_API_KEY", env_key)
    cfg = parse_config({"models": {"m": {"backend": "openai", "options": {
        "model": "x", "base_url": f"http://svc:{quote(password, safe='')}@internal:8000/v1"}}}})
    formatter = configure_logging(cfg.logging, cfg.secrets())
    assert isinstance(formatter, VecshimFormatter)
    record = logging.LogRecord("httpx", logging.INFO, __file__, 1, "POST %s with %s (basic %s)",
                               (f"http://svc:{quote(password, safe='')}@internal:8000/v1/embeddings", env_key,
                                base64.b64encode(f"svc:{password}".encode()).decode()), None)
    line = formatter.format(record)
    assert "http://svc:***@internal:8000/v1/embeddings" in line
    for secret in (password, env_key):
        for value in leaked_forms(secret).values():
            assert value not in line, line
    # An HTTP client's INFO request line is not shown at the default level.
    for name in ("httpx", "httpx2"):
        quiet = logging.LogRecord(name, logging.INFO, __file__, 1, "HTTP Request: POST %s", ("u",), None)
        assert not logging.getLogger(name).filter(quiet)
