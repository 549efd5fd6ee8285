"""The `openai` backend, driven through the real SDK against a fake OpenAI server."""
from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path

import pluggy
import pydantic
import pytest

from tests.fakes import (malformed, nan, nan_string, reset, slow, status, wrong_count,
                         wrong_length)
from tests.fakes.openai_upstream import FakeOpenAI
from vecshim import hookspecs
from vecshim.backends import openai_api
from vecshim.backends.openai_api import OpenAIBackend, OpenAIOptions
from vecshim.errors import BackendError, ConfigError, UpstreamError

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def fake():
    with FakeOpenAI(dim=8, api_key=KEY) as fake:
        yield fake


@pytest.fixture
def make_backend(fake):
    backends = []

    def make(**options):
        options = {"model": "text-embedding-3-small", "base_url": fake.url + "/v1",
                   "api_key": KEY, "timeout_s": 2.0, **options}
        backend = OpenAIBackend(OpenAIOptions(**options))
        backend.load()
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def test_vectors_come_back_in_order(fake, make_backend):
    backend = make_backend()
    texts = ["alpha", "beta", "gamma"]
    assert backend.embed(texts, "passage") == [fake.vector(t) for t in texts]
    (request,) = fake.requests
    assert request.path == "/v1/embeddings"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body == {"input": texts, "model": "text-embedding-3-small",
                            "encoding_format": "float"}


def test_data_is_sorted_by_index(fake, make_backend):
    fake.reverse_data = True
    texts = ["one", "two", "three"]
    assert make_backend().embed(texts, "query") == [fake.vector(t) for t in texts]


def test_dimensions_are_sent_when_set(fake, make_backend):
    vectors = make_backend(dimensions=3).embed(["x", "y"], "query")
    assert [len(v) for v in vectors] == [3, 3]
    assert fake.requests[0].body["dimensions"] == 3


def test_capabilities_follow_options():
    backend = OpenAIBackend(OpenAIOptions(model="text-embedding-3-large", max_batch_size=16,
                                          max_batch_tokens=1000, max_input_tokens=512))
    assert (backend.max_batch_size, backend.max_batch_tokens, backend.max_input_tokens) == (16, 1000, 512)
    assert backend.matryoshka and not backend.task_aware
    assert not OpenAIBackend(OpenAIOptions(model="nomic-embed-text")).matryoshka


def test_options_reject_unknown_keys_and_bad_combinations():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        OpenAIOptions(model="m", modle="typo")
    with pytest.raises(pydantic.ValidationError, match="api_version"):
        OpenAIOptions(model="m", azure_endpoint="https://x.openai.azure.com")
    with pytest.raises(pydantic.ValidationError, match="not both"):
        OpenAIOptions(model="m", api_key="k", api_key_file="/k")


def test_key_never_shows_in_options_or_info(make_backend):
    backend = make_backend(dimensions=4)
    assert KEY not in repr(backend.options) and KEY not in str(backend.options.model_dump())
    assert backend.info() == {"model": "text-embedding-3-small",
                              "host": backend.info()["host"], "dimensions": 4}
    assert backend.info()["host"].startswith("127.0.0.1:")
    assert KEY not in str(backend.info()) and KEY not in str(backend.fingerprint_parts())


def test_key_from_env_and_from_file(fake, make_backend, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert make_backend(api_key=None).embed(["a"], "query") == [fake.vector("a")]
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert make_backend(api_key=None, api_key_file=key_file).embed(["b"], "query") == [fake.vector("b")]


def test_missing_key_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIBackend(OpenAIOptions(model="m")).load()
    with pytest.raises(ConfigError, match="cannot read api_key_file"):
        OpenAIBackend(OpenAIOptions(model="m", api_key_file=tmp_path / "missing")).load()


def test_compatible_server_without_key(fake, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake.api_key = "no-key"
    backend = OpenAIBackend(OpenAIOptions(model="bge-small", base_url=fake.url + "/v1"))
    backend.load()
    try:
        assert backend.embed(["a"], "query") == [fake.vector("a")]
    finally:
        backend.close()


def test_azure_uses_deployment_route_and_api_key_header(fake):
    backend = OpenAIBackend(OpenAIOptions(model="text-embedding-3-small", api_key=KEY,
                                          azure_endpoint=fake.url, api_version="2024-10-21",
                                          azure_deployment="emb"))
    backend.load()
    try:
        assert backend.embed(["a"], "query") == [fake.vector("a")]
    finally:
        backend.close()
    (request,) = fake.requests
    assert request.path == "/openai/deployments/emb/embeddings"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == KEY


def test_wrong_key_is_not_retryable_and_never_leaks(fake, make_backend):
    wrong = "sk-wrong-9876543210fedcba"
    # The raw SDK quotes the key the fake echoes: the test would catch a leak.
    import openai
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key=wrong, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raw:
        client.embeddings.create(input=["a"], model="m")
    client.close()
    assert wrong in str(raw.value)

    with pytest.raises(UpstreamError) as caught:
        make_backend(api_key=wrong).embed(["a"], "query")
    err = caught.value
    assert (err.upstream_status, err.retryable) == (401, False)
    assert str(err) == "openai upstream returned 401 (authentication failed)"
    text = repr(err) + "".join(traceback.format_exception(err))
    assert "9876543210" not in text and "sk-wrong" not in text


@pytest.mark.parametrize("code, retryable", [(500, True), (502, True), (503, True),
                                             (408, True), (400, False), (404, False)])
def test_status_errors(fake, make_backend, code, retryable, caplog):
    fake.inject(status(code))
    with pytest.raises(UpstreamError) as caught:
        make_backend().embed(["a"], "query")
    assert (caught.value.upstream_status, caught.value.retryable) == (code, retryable)
    # The client sees the status and a vecshim phrase; the upstream's own text only reaches the log.
    assert str(caught.value).startswith(f"openai upstream returned {code} (") and "injected" not in str(caught.value)
    assert f"openai upstream returned {code}: injected {code}" in caplog.text


def test_429_carries_retry_after(fake, make_backend):
    fake.inject(status(429, retry_after=7))
    with pytest.raises(UpstreamError) as caught:
        make_backend().embed(["a"], "query")
    err = caught.value
    assert (err.upstream_status, err.retryable, err.retry_after) == (429, True, 7.0)
    assert "rate limited" in str(err)


def test_insufficient_quota_is_not_retryable(fake, make_backend):
    fake.inject(status(429, error_code="insufficient_quota"))
    with pytest.raises(UpstreamError, match="insufficient quota") as caught:
        make_backend().embed(["a"], "query")
    assert not caught.value.retryable


def test_timeout_is_retryable(fake, make_backend):
    fake.inject(slow(0.6))
    with pytest.raises(UpstreamError, match=r"timed out \(timeout_s=0.2\)") as caught:
        make_backend(timeout_s=0.2).embed(["a"], "query")
    assert caught.value.retryable and caught.value.upstream_status is None


def test_reset_connection_is_retryable(fake, make_backend):
    fake.inject(reset())
    with pytest.raises(UpstreamError, match="connection failed") as caught:
        make_backend().embed(["a"], "query")
    assert caught.value.retryable


def test_unreachable_server_is_retryable(fake, make_backend):
    backend = make_backend()
    fake.stop()
    with pytest.raises(UpstreamError, match="connection failed") as caught:
        backend.embed(["a"], "query")
    assert caught.value.retryable


@pytest.mark.parametrize("fault, message", [
    (malformed(), "malformed JSON"),
    (wrong_count(), "returned 1 vector\\(s\\) for 2 text\\(s\\)"),
    (wrong_length(), "length 7 at index 1, expected 8"),
    (nan(), "non-finite value \\(nan\\)"),
    (nan_string(), "non-number \\('NaN'\\)"),
])
def test_bad_replies_are_backend_errors(fake, make_backend, fault, message):
    fake.inject(fault)
    with pytest.raises(BackendError, match=message) as caught:
        make_backend().embed(["a", "b"], "query")
    assert not isinstance(caught.value, UpstreamError)


def test_server_ignoring_dimensions_is_a_backend_error(fake, make_backend):
    fake.honour_dimensions = False  # as some OpenAI-compatible servers do
    with pytest.raises(BackendError, match="length 8 at index 0, expected 4"):
        make_backend(dimensions=4).embed(["a", "b"], "query")


def test_fake_base64_matches_the_sdk_decoder(fake):
    import openai
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key=KEY, max_retries=0)
    try:
        reply = client.embeddings.create(input=["a"], model="m")  # SDK asks for base64
    finally:
        client.close()
    assert fake.requests[0].body["encoding_format"] == "base64"
    assert reply.data[0].embedding == pytest.approx(fake.vector("a"), abs=1e-6)


def test_missing_sdk_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ConfigError, match=r"pip install 'vecshim\[openai\]'"):
        OpenAIBackend(OpenAIOptions(model="m", api_key=KEY)).load()


def test_import_does_not_load_the_sdk():
    code = "import sys, vecshim.backends.openai_api; print('openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_registers_through_the_hook():
    pm = pluggy.PluginManager(hookspecs.NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(openai_api)
    registered = []
    pm.hook.register_backends(register=registered.append)
    assert registered == [OpenAIBackend] and OpenAIBackend.name == "openai"
