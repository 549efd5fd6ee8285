"""Hosted backends end to end: Weaviate-style client -> vecshim over HTTP -> real SDK -> fake upstream.

Every test checks what Weaviate's Go client would see: a 200 with the
upstream's vector, or a JSON `{"error": ...}` naming what went wrong, in
bounded time. The fakes speak the real OpenAI and Cohere wire formats
(tests/fakes); nothing in the SDKs is mocked.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from tests.fakes import malformed, nan, reset, slow, status, wrong_count, wrong_length
from tests.fakes.cohere_upstream import FakeCohere
from tests.fakes.openai_upstream import FakeOpenAI
from vecshim.app import create_app
from vecshim.errors import ConfigError

KEY = "sk-e2e-SECRET-0123456789abcdef"
WRONG_KEY = "sk-e2e-WRONG-fedcba9876543210"
CO_KEY = "co-e2e-SECRET-0123456789abcdef"
ENV = "VECSHIM_E2E_OPENAI_KEY"

#: Small budgets keep failure tests short; the defaults are sized for Weaviate's 50 s.
FAST_RETRY = {"max_attempts": 5, "budget_s": 3.0, "base_delay_s": 0.05, "max_delay_s": 0.5}
NO_CIRCUIT = {"failures": 1000, "reset_s": 1.0}


@pytest.fixture(autouse=True)
def _key_env(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


@pytest.fixture
def fake():
    with FakeOpenAI(dim=8, api_key=KEY) as fake:
        yield fake


@pytest.fixture
def cohere_fake():
    with FakeCohere(dim=8, api_key=CO_KEY) as fake:
        yield fake


def openai_model(fake, *, retry=None, circuit=None, batch=None, **options) -> dict:
    """An `openai` model on `fake`, its key given as `${ENV}`."""
    return {"backend": "openai",
            "options": {"model": "text-embedding-3-small", "base_url": fake.url + "/v1",
                        "api_key": "${%s}" % ENV, "timeout_s": 2.0, **options},
            "batch": batch or {"max_size": 256, "max_wait_ms": 10},
            "retry": retry or FAST_RETRY, "circuit": circuit or NO_CIRCUIT}


def cohere_model(fake, key_file, **options) -> dict:
    """A `cohere` model on `fake`, its key read from `key_file`."""
    return {"backend": "cohere",
            "options": {"base_url": fake.url, "api_key_file": str(key_file), "timeout_s": 2.0, **options},
            "batch": {"max_size": 256, "max_wait_ms": 10}, "retry": FAST_RETRY, "circuit": NO_CIRCUIT}


def config(**models) -> dict:
    return {"models": models, "cache": {"enabled": False}}


def embed_calls(fake) -> list:
    """Upstream embedding calls since the last `fake.clear()`."""
    return [r for r in fake.requests if r.method == "POST"]


def assert_vector(reply, expected):
    assert reply.status == 200, reply.body
    assert reply.json()["vector"] == pytest.approx(expected, abs=1e-6)


def assert_error(reply, status_codes, *fragments):
    """A JSON error Weaviate can decode: `{"error": "<string>"}` at a non-200 status."""
    assert reply.status in status_codes, (reply.status, reply.body)
    body = reply.json()
    assert isinstance(body, dict) and isinstance(body["error"], str), body
    assert "vector" not in body
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


# -- normal traffic -------------------------------------------------------------

def test_openai_vectors_are_the_upstream_vectors(serve, fake):
    s = serve(config(oai=openai_model(fake)))
    fake.clear()
    client = s.client()
    for text in ["The London Eye is a ferris wheel", "Zürich & <Genève>"]:
        assert_vector(client.vectors(text), fake.vector(text))
    (first, _) = embed_calls(fake)
    assert first.path == "/v1/embeddings"
    assert first.headers["authorization"] == f"Bearer {KEY}"  # expanded from ${ENV}
    assert first.body["input"] == ["The London Eye is a ferris wheel"]
    meta = client.request("GET", "/meta").json()
    assert meta["model"]["state"] == "ready" and meta["model"]["dimension"] == 8


def test_cohere_maps_tasks_to_input_types(serve, cohere_fake, tmp_path):
    key_file = tmp_path / "cohere.key"
    key_file.write_text(CO_KEY + "\n")
    s = serve(config(co=cohere_model(cohere_fake, key_file)))
    cohere_fake.clear()
    client = s.client()
    assert_vector(client.vectors("what is a ferris wheel", task_type="query"),
                  cohere_fake.vector("what is a ferris wheel", "search_query"))
    assert_vector(client.vectors("The London Eye is a ferris wheel", task_type="passage"),
                  cohere_fake.vector("The London Eye is a ferris wheel", "search_document"))
    # Old Weaviate versions send no task_type: that is a passage.
    assert_vector(client.vectors("no task", task_type=None), cohere_fake.vector("no task", "search_document"))
    query, passage, _ = embed_calls(cohere_fake)
    assert query.headers["authorization"] == f"Bearer {CO_KEY}"  # read from api_key_file
    assert (query.body["input_type"], passage.body["input_type"]) == ("search_query", "search_document")


def test_cohere_input_type_override_and_output_dimension(serve, cohere_fake, tmp_path):
    key_file = tmp_path / "cohere.key"
    key_file.write_text(CO_KEY)
    s = serve(config(co=cohere_model(cohere_fake, key_file, input_type_passage="clustering",
                                     output_dimension=4)))
    reply = s.client().vectors("grouped text")
    assert_vector(reply, cohere_fake.vector("grouped text", "clustering", dim=4))
    assert cohere_fake.requests[-1].body["output_dimension"] == 4


def _hammer(s, clients: int, per_client: int, tasks=("passage",)) -> list:
    """`clients` Go-style clients send `per_client` texts each, back to back; return (text, task, reply)."""
    results, lock = [], threading.Lock()

    def run(c: int):
        client = s.client()
        for i in range(per_client):
            text, task = f"client {c} text {i}", tasks[(c + i) % len(tasks)]
            reply = client.vectors(text, task_type=task)
            with lock:
                results.append((text, task, reply))
        client.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# The upstream answers slowly (0.3 s) so that, however loaded the machine, the clients'
# next texts arrive while calls are in flight: those must join the next call together.
SLOW_UPSTREAM_S = 0.3


def test_concurrent_clients_are_coalesced_into_few_calls(serve):
    with FakeOpenAI(dim=8, api_key=KEY, latency_s=SLOW_UPSTREAM_S) as fake:
        s = serve(config(oai=openai_model(fake, batch={"max_size": 256, "max_wait_ms": 20})))
        fake.clear()
        results = _hammer(s, clients=32, per_client=8)
        assert len(results) == 256
        for text, _, reply in results:
            assert_vector(reply, fake.vector(text))
        calls = embed_calls(fake)
        assert sum(len(c.body["input"]) for c in calls) == 256  # every text embedded exactly once
        assert len(calls) <= 256 / 4, len(calls)
        assert fake.max_in_flight <= 4  # the openai backend's batch workers


def test_cohere_batches_respect_96_texts_and_never_mix_tasks(serve, tmp_path):
    key_file = tmp_path / "cohere.key"
    key_file.write_text(CO_KEY)
    with FakeCohere(dim=8, api_key=CO_KEY, latency_s=SLOW_UPSTREAM_S) as fake:
        s = serve(config(co=cohere_model(fake, key_file)))
        fake.clear()
        results = _hammer(s, clients=32, per_client=8, tasks=("query", "passage"))
        input_types = {"query": "search_query", "passage": "search_document"}
        for text, task, reply in results:
            assert_vector(reply, fake.vector(text, input_types[task]))
        calls = embed_calls(fake)
        assert all(len(c.body["texts"]) <= 96 for c in calls)
        assert len(calls) <= 256 / 4, len(calls)
        for c in calls:  # one input_type per call, and the texts were sent with that task
            sent = {text: task for text, task, _ in results}
            assert {input_types[sent[t]] for t in c.body["texts"]} == {c.body["input_type"]}


# -- absorbed upstream failures -----------------------------------------------------

def test_429_with_retry_after_is_absorbed(serve, fake):
    s = serve(config(oai=openai_model(fake)))
    fake.clear()
    fake.inject(status(429, retry_after=1))
    start = time.monotonic()
    assert_vector(s.client().vectors("paced"), fake.vector("paced"))
    assert time.monotonic() - start >= 0.95  # Retry-After honoured
    assert len(embed_calls(fake)) == 2


@pytest.mark.parametrize("fault", [status(500), status(502), status(503), reset()], ids=str)
def test_server_errors_and_resets_are_absorbed(serve, fake, fault):
    s = serve(config(oai=openai_model(fake)))
    fake.clear()
    fake.inject(fault, times=2)
    assert_vector(s.client().vectors("eventually"), fake.vector("eventually"))
    assert len(embed_calls(fake)) == 3


def test_upstream_down_past_the_budget_is_a_json_error_within_the_budget(serve, fake):
    retry = {"max_attempts": 100, "budget_s": 1.5, "base_delay_s": 0.05, "max_delay_s": 0.3}
    s = serve(config(oai=openai_model(fake, retry=retry)))
    fake.always(status(503))
    start = time.monotonic()
    reply = s.client().vectors("doomed")
    elapsed = time.monotonic() - start
    error = assert_error(reply, (502, 503), "openai upstream returned 503", "attempts")
    assert elapsed <= 1.5 + 0.5, elapsed
    assert "1.5 s budget" in error or "in 1." in error


def test_upstream_timeouts_become_an_error_not_a_hang(serve, fake):
    retry = {"max_attempts": 10, "budget_s": 1.5, "base_delay_s": 0.05, "max_delay_s": 0.2}
    s = serve(config(oai=openai_model(fake, retry=retry, timeout_s=0.3)))
    fake.always(slow(2.0))
    start = time.monotonic()
    reply = s.client().vectors("slow")
    assert_error(reply, (502, 503, 504), "timed out")
    assert time.monotonic() - start <= 1.5 + 0.5


def test_circuit_opens_fails_fast_and_recovers(serve, fake):
    retry = {"max_attempts": 3, "budget_s": 2.0, "base_delay_s": 0.01, "max_delay_s": 0.05}
    s = serve(config(oai=openai_model(fake, retry=retry, circuit={"failures": 3, "reset_s": 1.0})))
    client = s.client()
    fake.always(status(500))
    assert_error(client.vectors("one"), (502, 503), "500")
    fake.clear()  # the upstream is still down, but the circuit is open now
    fake.always(status(500))
    start = time.monotonic()
    reply = client.vectors("two")
    assert time.monotonic() - start < 0.25
    assert_error(reply, (503,), "circuit open")
    assert int(reply.headers["retry-after"]) >= 1
    assert embed_calls(fake) == []  # failed fast, upstream spared
    fake.always(None)  # upstream back
    time.sleep(1.05)
    assert_vector(client.vectors("three"), fake.vector("three"))  # the probe closes the circuit
    assert_vector(client.vectors("four"), fake.vector("four"))


# -- bad replies -------------------------------------------------------------------

@pytest.mark.parametrize("fault, fragment", [
    (malformed(), "malformed JSON"),
    (wrong_count(), "0 vector(s) for 1 text(s)"),
    (wrong_length(), "length 7"),
    (nan(), "non-finite"),
], ids=["malformed", "wrong_count", "wrong_length", "nan"])
def test_bad_replies_are_errors_never_bad_vectors(serve, fake, fault, fragment):
    s = serve(config(oai=openai_model(fake)))
    fake.clear()
    fake.inject(fault)
    assert_error(s.client().vectors("spoiled"), (502,), fragment)
    assert len(embed_calls(fake)) == 1  # not retried: the upstream answered, wrongly
    assert_vector(s.client().vectors("fine"), fake.vector("fine"))


def test_cohere_bad_reply_is_an_error(serve, cohere_fake, tmp_path):
    key_file = tmp_path / "cohere.key"
    key_file.write_text(CO_KEY)
    s = serve(config(co=cohere_model(cohere_fake, key_file)))
    cohere_fake.inject(nan())
    assert_error(s.client().vectors("spoiled"), (502,), "non-finite")
    cohere_fake.inject(malformed())
    assert_error(s.client().vectors("spoiled"), (502,), "not valid JSON")


# -- startup and keys --------------------------------------------------------------

def test_bad_key_fails_readiness_without_leaking_and_recovers(serve, fake, monkeypatch, caplog, capfd):
    monkeypatch.setenv(ENV, WRONG_KEY)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="vecshim")
    cfg = config(oai=openai_model(fake))
    cfg["logging"] = {"level": "DEBUG"}  # the SDK's and httpx's debug logs too
    s = serve(cfg, wait=False)
    client = s.client()
    deadline = time.monotonic() + 10
    while s.state.models["oai"].state != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = client.request("GET", "/.well-known/ready")
    assert ready.status == 503
    reason = ready.json()["error"]
    assert "failed" in reason and "401" in reason and "authentication failed" in reason
    meta = client.request("GET", "/meta")
    model = meta.json()["models"]["oai"]
    assert model["state"] == "failed" and "401" in model["error"]
    assert_error(client.vectors("too early"), (503,), "not ready")
    # The fake echoes the presented key in its 401 body; none of it may surface.
    assert fake.requests and all(r.headers["authorization"] == f"Bearer {WRONG_KEY}" for r in fake.requests)
    out, err = capfd.readouterr()
    for where in (ready.body.decode(), meta.body.decode(), caplog.text, out, err):
        assert WRONG_KEY not in where and "WRONG" not in where
    assert "failed to load" in caplog.text
    # Fix the key upstream: the background loader retries with backoff and the model comes up.
    fake.api_key = WRONG_KEY
    assert s.state.wait_ready(10), s.state.not_ready_reason()
    assert client.request("GET", "/.well-known/ready").status == 204
    assert client.request("GET", "/meta").json()["models"]["oai"]["state"] == "ready"
    assert_vector(client.vectors("now"), fake.vector("now"))
    out, err = capfd.readouterr()
    assert WRONG_KEY not in caplog.text + out + err


def test_unreachable_upstream_fails_readiness_not_the_process(serve, fake):
    model = openai_model(fake, retry={"max_attempts": 2, "budget_s": 0.5, "base_delay_s": 0.01})
    fake.stop()  # nothing listens there now
    s = serve(config(oai=model), wait=False)
    deadline = time.monotonic() + 10
    while s.state.models["oai"].state != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = s.client().request("GET", "/.well-known/ready")
    assert ready.status == 503 and "connection failed" in ready.json()["error"]


# -- fallbacks ----------------------------------------------------------------------

def test_fallback_deployment_serves_while_the_primary_is_down(serve, fake):
    with FakeOpenAI(dim=8, api_key=KEY) as backup_fake:
        retry = {"max_attempts": 2, "budget_s": 0.5, "base_delay_s": 0.01, "max_delay_s": 0.05}
        primary = openai_model(fake, retry=retry)
        primary["fallbacks"] = ["backup"]
        s = serve(config(primary=primary, backup=openai_model(backup_fake)))
        fake.always(status(500))
        backup_fake.clear()
        assert_vector(s.client().vectors("rescued"), backup_fake.vector("rescued"))
        assert [r.body["input"] for r in embed_calls(backup_fake)] == [["rescued"]]
        fake.always(None)
        fake.clear()
        assert_vector(s.client().vectors("home again"), fake.vector("home again"))
        assert len(embed_calls(fake)) == 1


@pytest.mark.parametrize("backup_options,named", [
    ({"model": "text-embedding-3-large"}, 'backend.model "text-embedding-3-large" \u2260 "text-embedding-3-small"'),
    ({"dimensions": 256}, "backend.dimensions 256 \u2260 null")], ids=["other-model", "other-dimensions"])
def test_fallback_in_another_vector_space_is_rejected_at_startup(fake, backup_options, named):
    primary = openai_model(fake)
    primary["fallbacks"] = ["backup"]
    backup = openai_model(fake)
    backup["options"].update(backup_options)
    with pytest.raises(ConfigError) as info:
        create_app(config(primary=primary, backup=backup), load_entrypoints=False, load=False)
    message = info.value.message
    assert "models.primary.fallbacks: fallback backup: " in message and named in message
    assert "{" not in message and KEY not in message  # the differing key, not two raw dicts


def test_fallback_whose_learnt_dimension_differs_is_never_used(serve, fake):
    # Same options, so startup accepts it, but the deployment answers 16-dim vectors.
    with FakeOpenAI(dim=16, api_key=KEY) as other:
        retry = {"max_attempts": 2, "budget_s": 0.5, "base_delay_s": 0.01, "max_delay_s": 0.05}
        primary = openai_model(fake, retry=retry)
        primary["fallbacks"] = ["backup"]
        s = serve(config(primary=primary, backup=openai_model(other)))
        fake.always(status(500))
        other.clear()
        assert_error(s.client().vectors("no mixing"), (502,), "500")
        assert embed_calls(other) == []


def test_meta_never_shows_keys(serve, fake, cohere_fake, tmp_path):
    key_file = tmp_path / "cohere.key"
    key_file.write_text(CO_KEY)
    s = serve(config(oai=openai_model(fake), co=cohere_model(cohere_fake, key_file)))
    client = s.client()
    for path in ("/meta", "/models/oai/meta", "/models/co/meta", "/v1/models"):
        reply = client.request("GET", path)
        assert reply.status == 200
        assert KEY not in reply.body.decode() and CO_KEY not in reply.body.decode()
    meta = json.loads(client.request("GET", "/meta").body)
    assert meta["models"]["oai"]["model"]["host"] == fake.url.split("//")[1]


def test_mismatched_fallback_is_skipped_before_the_loader_drops_it(serve, fake, monkeypatch):
    # The window between "all models ready" and the loader's fallback check.
    from vecshim.loader import ModelSet
    monkeypatch.setattr(ModelSet, "check_fallbacks", lambda self: None)
    with FakeOpenAI(dim=16, api_key=KEY) as other:
        retry = {"max_attempts": 2, "budget_s": 0.5, "base_delay_s": 0.01, "max_delay_s": 0.05}
        primary = openai_model(fake, retry=retry)
        primary["fallbacks"] = ["backup"]
        s = serve(config(primary=primary, backup=openai_model(other)))
        assert [fb.name for fb in s.state.models["primary"].fallbacks] == ["backup"]
        fake.always(status(500))
        other.clear()
        assert_error(s.client().vectors("no mixing"), (502,), "500")
        assert embed_calls(other) == []


def test_every_mismatched_fallback_is_dropped(serve, fake):
    with FakeOpenAI(dim=16, api_key=KEY) as one, FakeOpenAI(dim=4, api_key=KEY) as two:
        primary = openai_model(fake)
        primary["fallbacks"] = ["one", "two"]
        s = serve(config(primary=primary, one=openai_model(one), two=openai_model(two)))
        s.state.loader._loader.join(5)
        assert s.state.models["primary"].fallbacks == []
