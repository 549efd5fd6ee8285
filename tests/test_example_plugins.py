"""Behaviour of the example plugins in plugins/ beyond the conformance kit."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT
from internal_service import InternalService, service_vector
from vecshim import BackendError, UpstreamError
from vecshim.plugins import collect_backends, get_plugin_manager

REGISTRY = collect_backends(get_plugin_manager(dirs=[ROOT / "plugins"], load_entrypoints=False))
HTTP = REGISTRY.get("http-service")
http_module = __import__(HTTP.__module__)


def http_backend(url, **options):
    backend = HTTP(HTTP.Options(url=url, **options))
    backend.load()
    return backend


@pytest.mark.parametrize("reply, path, want", [
    ({"data": [{"embedding": [1]}, {"embedding": [2]}]}, "data.*.embedding", [[1], [2]]),
    ({"embeddings": [[1], [2]]}, "embeddings", [[1], [2]]),
    ([[1], [2]], "", [[1], [2]]),
    ({"out": [{"v": [[1, 2]]}]}, "out.0.v.0", [1, 2]),
])
def test_extract(reply, path, want):
    assert http_module.extract(reply, path) == want


@pytest.mark.parametrize("reply, path, message", [
    ({"data": {}}, "data.*.embedding", "'data' is not a list"),
    ({"data": []}, "vectors", r"no 'vectors' at '\(root\)'"),
    ({"a": [1]}, "a.3", "index 3 out of range"),
])
def test_extract_errors(reply, path, message):
    with pytest.raises(KeyError, match=message):
        http_module.extract(reply, path)


def test_batch_request_template_task_values_and_token():
    with InternalService(dim=6, token="tok-abcdef-123") as svc:
        backend = http_backend(svc.url + "/encode", request={"inputs": "$texts", "kind": "$task", "fixed": [1]},
                               response_path="result.*.vector", api_key="tok-abcdef-123",
                               task_values={"query": "q", "passage": "doc"})
        assert backend.task_aware and not backend.per_text
        vectors = backend.embed(["a", "b"], "query")
        assert np.allclose(vectors, [service_vector("a", "q", 6), service_vector("b", "q", 6)])
        body, headers = svc.requests[-1]
        assert body == {"inputs": ["a", "b"], "kind": "q", "fixed": [1]}
        assert headers["authorization"] == "Bearer tok-abcdef-123"
        assert "tok-abcdef" not in str(backend.info())


def test_one_request_per_text():
    with InternalService(dim=4) as svc:
        backend = http_backend(svc.url + "/one", request={"text": "$text"}, response_path="embedding")
        assert backend.embed(["x", "y", "z"], "passage") == [service_vector(t, "", 4) for t in "xyz"]
        assert [b for b, _ in svc.requests] == [{"text": t} for t in "xyz"]


@pytest.mark.parametrize("status, retryable", [(500, True), (503, True), (429, True), (400, False), (404, False)])
def test_http_errors_are_upstream_errors(status, retryable):
    with InternalService() as svc:
        svc.status = status
        backend = http_backend(svc.url + "/encode", request={"inputs": "$texts"}, response_path="result.*.vector")
        with pytest.raises(UpstreamError) as excinfo:
            backend.embed(["a"], "passage")
        err = excinfo.value
        assert (err.upstream_status, err.retryable, err.retry_after) == (status, retryable, 0.0)
        assert err.message == f"127.0.0.1 answered {status}"


@pytest.mark.parametrize("body, message", [
    (b"<html>oops", "not JSON"),
    (b'{"result": {"vector": [1]}}', "no vectors at 'result.*.vector'"),
    (b'{"result": []}', "returned 0 vectors for 1 texts"),
])
def test_unusable_replies_are_backend_errors(body, message):
    with InternalService() as svc:
        svc.body = body
        backend = http_backend(svc.url + "/encode", request={"inputs": "$texts"}, response_path="result.*.vector")
        with pytest.raises(BackendError, match=message) as excinfo:
            backend.embed(["a"], "passage")
        assert not isinstance(excinfo.value, UpstreamError) or not excinfo.value.retryable


def test_timeout_is_retryable():
    with InternalService() as svc:
        svc.delay_s = 0.5
        backend = http_backend(svc.url + "/encode", request={"inputs": "$texts"}, response_path="result.*.vector",
                               timeout_s=0.1)
        with pytest.raises(UpstreamError, match="unreachable") as excinfo:
            backend.embed(["a"], "passage")
        assert excinfo.value.retryable


def test_example_plugins_served_from_a_config(serve):
    with InternalService(dim=5) as svc:
        served = serve({
            "plugins": {"dirs": [str(ROOT / "plugins")]},
            "models": {
                "fn": {"backend": "python-function", "options": {"dimensions": 32}},
                "svc": {"backend": "http-service", "options": {
                    "url": svc.url + "/encode", "request": {"inputs": "$texts"}, "response_path": "result.*.vector"}},
            },
            "cache": {"enabled": False}})
        client = served.client()
        a, b, c = (np.array(client.vectors(t, base="/models/fn").json()["vector"])
                   for t in ("red apples ripen", "ripe red apples", "income tax law"))
        assert len(a) == 32 and a @ b > a @ c
        reply = client.vectors("hello", base="/models/svc")
        assert reply.status == 200
        assert np.allclose(reply.json()["vector"], service_vector("hello", "", 5), atol=1e-6)
