"""The `cohere` backend, driven through the real SDK against a fake Cohere server."""
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
from tests.fakes.cohere_upstream import FakeCohere
from vecshim import hookspecs
from vecshim.backends import cohere_api
from vecshim.backends.cohere_api import CohereBackend, CohereOptions
from vecshim.errors import BackendError, ConfigError, UpstreamError

KEY = "co-test-0123456789abcdef"


@pytest.fixture
def fake():
    with FakeCohere(dim=8, api_key=KEY) as fake:
        yield fake


@pytest.fixture
def make_backend(fake):
    backends = []

    def make(**options):
        options = {"base_url": fake.url, "api_key": KEY, "timeout_s": 2.0, **options}
        backend = CohereBackend(CohereOptions(**options))
        backend.load()
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def test_tasks_map_to_input_types(fake, make_backend):
    backend = make_backend()
    texts = ["alpha", "beta"]
    assert backend.embed(texts, "query") == [fake.vector(t, "search_query") for t in texts]
    assert backend.embed(texts, "passage") == [fake.vector(t, "search_document") for t in texts]
    query, passage = fake.requests
    assert query.path == "/v2/embed"
    assert query.headers["authorization"] == f"Bearer {KEY}"
    assert query.body == {"model": "embed-english-v3.0", "texts": texts, "input_type": "search_query",
                          "embedding_types": ["float"], "truncate": "END"}
    assert passage.body["input_type"] == "search_document"


def test_input_types_and_truncate_can_be_overridden(fake, make_backend):
    backend = make_backend(input_type_query="classification", input_type_passage="clustering",
                           truncate="NONE")
    backend.embed(["q"], "query")
    backend.embed(["p"], "passage")
    assert [(r.body["input_type"], r.body["truncate"]) for r in fake.requests] == [
        ("classification", "NONE"), ("clustering", "NONE")]


def test_output_dimension_is_sent_when_set(fake, make_backend):
    vectors = make_backend(model="embed-v4.0", output_dimension=4).embed(["x", "y"], "passage")
    assert [len(v) for v in vectors] == [4, 4]
    assert fake.requests[0].body["output_dimension"] == 4
    assert fake.requests[0].body["model"] == "embed-v4.0"


def test_capabilities_and_info(make_backend):
    backend = make_backend(max_batch_size=10)
    assert backend.task_aware and backend.max_batch_size == 10 and backend.max_input_tokens == 512
    info = backend.info()
    assert info["model"] == "embed-english-v3.0" and info["host"].startswith("127.0.0.1:")
    assert info["input_types"] == {"query": "search_query", "passage": "search_document"}
    assert KEY not in str(info) and KEY not in repr(backend.options)
    assert CohereBackend(CohereOptions()).info()["host"] == "api.cohere.com"


def test_options_reject_unknown_keys_and_bad_values():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        CohereOptions(input_type="search_query")
    with pytest.raises(pydantic.ValidationError, match="truncate"):
        CohereOptions(truncate="MIDDLE")


@pytest.mark.parametrize("env", ["CO_API_KEY", "COHERE_API_KEY"])
def test_key_from_env(fake, make_backend, monkeypatch, env):
    monkeypatch.delenv("CO_API_KEY", raising=False)
    monkeypatch.delenv("COHERE_API_KEY", raising=False)
    monkeypatch.setenv(env, KEY)
    assert make_backend(api_key=None).embed(["a"], "query") == [fake.vector("a", "search_query")]


def test_key_from_file(fake, make_backend, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    assert make_backend(api_key=None, api_key_file=key_file).embed(["a"], "query")


def test_missing_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv("CO_API_KEY", raising=False)
    monkeypatch.delenv("COHERE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="CO_API_KEY"):
        CohereBackend(CohereOptions()).load()


@pytest.mark.parametrize("code", [401, 498])
def test_wrong_key_is_not_retryable_and_never_leaks(fake, make_backend, code):
    wrong = "co-wrong-9876543210fedcba"
    if code == 498:
        fake.inject(status(498))
    with pytest.raises(UpstreamError) as caught:
        make_backend(api_key=wrong if code == 401 else KEY).embed(["a"], "query")
    err = caught.value
    assert (err.upstream_status, err.retryable) == (code, False)
    assert str(err) == f"cohere upstream returned {code} (authentication failed)"
    text = repr(err) + "".join(traceback.format_exception(err))
    assert "9876543210" not in text and KEY not in text


@pytest.mark.parametrize("code, retryable", [(500, True), (503, True), (504, True),
                                             (400, False), (422, False)])
def test_status_errors(fake, make_backend, code, retryable, caplog):
    fake.inject(status(code))
    with pytest.raises(UpstreamError) as caught:
        make_backend().embed(["a"], "query")
    assert (caught.value.upstream_status, caught.value.retryable) == (code, retryable)
    # The client sees the status and a vecshim phrase; the upstream's own text only reaches the log.
    assert str(caught.value).startswith(f"cohere upstream returned {code} (") and "injected" not in str(caught.value)
    assert f"cohere upstream returned {code}: injected {code}" in caplog.text


def test_429_carries_retry_after(fake, make_backend):
    fake.inject(status(429, retry_after=3))
    with pytest.raises(UpstreamError, match="rate limited") as caught:
        make_backend().embed(["a"], "query")
    assert (caught.value.upstream_status, caught.value.retryable, caught.value.retry_after) == (429, True, 3.0)


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


@pytest.mark.parametrize("fault, message", [
    (malformed(), "not valid JSON"),
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


def test_missing_sdk_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cohere", None)
    with pytest.raises(ConfigError, match=r"pip install 'vecshim\[cohere\]'"):
        CohereBackend(CohereOptions(api_key=KEY)).load()


def test_import_does_not_load_the_sdk():
    code = "import sys, vecshim.backends.cohere_api; print('cohere' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_registers_through_the_hook():
    pm = pluggy.PluginManager(hookspecs.NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(cohere_api)
    registered = []
    pm.hook.register_backends(register=registered.append)
    assert registered == [CohereBackend] and CohereBackend.name == "cohere"
