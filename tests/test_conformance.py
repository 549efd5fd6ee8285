"""The conformance kit (vecshim.testing) against the built-in backends and every example plugin."""
from __future__ import annotations

import pytest

from conftest import ROOT
from fakebackend import FakeBackend
from internal_service import InternalService
from tests.fakes.cohere_upstream import FakeCohere
from tests.fakes.openai_upstream import FakeOpenAI
from vecshim.plugins import collect_backends, get_plugin_manager
from vecshim.testing import BackendConformance

REGISTRY = collect_backends(get_plugin_manager(dirs=[ROOT / "plugins"], load_entrypoints=False))
OPENAI = FakeOpenAI(dim=12, api_key="sk-conformance-openai-0123").start()
COHERE = FakeCohere(dim=12, api_key="conformance-cohere-key-4567").start()
#: Nothing listens on port 9 (discard) on 127.0.0.1: connections are refused at once.
CLOSED = "http://127.0.0.1:9"


@pytest.fixture(scope="module", autouse=True)
def _stop_fakes():
    yield
    OPENAI.stop()
    COHERE.stop()
    SERVICE.__exit__()


class TestFakeBackend(BackendConformance):
    backend_class = FakeBackend
    options = {"dim": 8, "max_input_tokens": 40, "task_aware": True}


@pytest.mark.slow
class TestSentenceTransformers(BackendConformance):
    backend_class = REGISTRY.get("sentence-transformers")
    options = {"model": "bundled"}
    invalid_options = ({"threads": 0}, {"precision": "int4"})


class TestOpenAI(BackendConformance):
    backend_class = REGISTRY.get("openai")
    options = {"model": "text-embedding-3-small", "base_url": OPENAI.url + "/v1", "api_key": OPENAI.api_key}
    secret_values = (OPENAI.api_key,)
    invalid_options = ({"base_url": OPENAI.url, "azure_endpoint": OPENAI.url}, {"timeout_s": 0})
    failing_options = {"model": "m", "base_url": CLOSED + "/v1", "api_key": "sk-never-shown-0123"}


class TestCohere(BackendConformance):
    backend_class = REGISTRY.get("cohere")
    options = {"base_url": COHERE.url, "api_key": COHERE.api_key}
    secret_values = (COHERE.api_key,)
    invalid_options = ({"truncate": "MIDDLE"}, {"max_batch_size": 0})
    failing_options = {"base_url": CLOSED, "api_key": "never-shown-cohere-key"}


class TestFunctionTemplate(BackendConformance):
    backend_class = REGISTRY.get("python-function")
    options = {"dimensions": 64}
    invalid_options = ({"dimensions": 4},)


@pytest.mark.slow
class TestModel2Vec(BackendConformance):
    """Distils from the bundled MiniLM once into the user's cache (about 30 s), then loads it."""

    backend_class = REGISTRY.get("model2vec")
    options = {"pca_dims": 64}
    invalid_options = ({"pca_dims": 2}, {"model": "x", "distill_from": "bundled"})


SERVICE = InternalService(dim=10, token="internal-token-abcdef").__enter__()


class TestHttpServiceBatch(BackendConformance):
    backend_class = REGISTRY.get("http-service")
    options = {"url": SERVICE.url + "/encode", "request": {"inputs": "$texts", "kind": "$task"},
               "response_path": "result.*.vector", "task_values": {"query": "q", "passage": "doc"},
               "api_key": SERVICE.token, "normalized": True}
    secret_values = (SERVICE.token,)
    invalid_options = ({"url": "not a url"}, {"url": SERVICE.url, "request": {"a": "$texts", "b": "$text"}},
                       {"url": SERVICE.url, "response_path": "a..b"})
    failing_options = {"url": CLOSED + "/encode", "request": {"inputs": "$texts"}, "api_key": "never-shown-1234"}


class TestHttpServicePerText(BackendConformance):
    backend_class = REGISTRY.get("http-service")
    options = {"url": SERVICE.url + "/one", "request": {"text": "$text"}, "response_path": "embedding",
               "api_key": SERVICE.token}
