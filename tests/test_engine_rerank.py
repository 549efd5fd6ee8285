"""Rerankers in the engine (real `vecshim serve`): one copy per replica, in-process scores, JSON errors, crash.

Two servers share one config: the default `vecshim serve` (HTTP workers plus
the engine) and `--workers 1` (everything in-process), so every answer of the
first can be compared with the second's, byte for byte.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import wait_http
from goclient import GoClient
from test_engine import alive, children, hup_under_load, meta, wait_for
from test_production import fake_model, start, stop
from test_rerank_cross_encoder import save_tiny_cross_encoder
from tests.fakes import status
from tests.fakes.cohere_rerank_upstream import FakeCohereRerank, relevance

from vecshim.server import DEFAULT_WORKERS

pytestmark = pytest.mark.slow
KEY = "co-rerank-0123456789abcdef"
QUERY = "which animal jumps?"
LONG = " ".join("river lantern quietly mountain seven copper harbour whisper garden electric".split() * 40)
DOCS = ["The quick brown fox jumps over the lazy dog.", "", "Paris is the capital of France.", LONG, "short"]


def maps(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def same(reply) -> dict:
    """A JSON reply without the fresh uuid Cohere-shaped replies carry."""
    data = reply.json()
    data.pop("id", None)
    return data


def post(port: int, path: str, body: dict):
    c = GoClient("127.0.0.1", port)
    try:
        return c.request("POST", path, json.dumps(body).encode())
    finally:
        c.close()


@pytest.fixture(scope="module")
def upstream():
    with FakeCohereRerank(api_key=KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def servers(tmp_path_factory, upstream):
    """(engine server, in-process server) with a cross-encoder, a hosted, a failing and a bi-encoder reranker."""
    tiny = str(save_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce")))
    config = {**fake_model(), "default_reranker": "ce", "rerankers": {
        "ce": {"backend": "cross-encoder", "aliases": ["tiny"], "options": {"model": tiny}},
        "co": {"backend": "cohere", "retry": {"max_attempts": 1},
               "options": {"base_url": upstream.url, "api_key": KEY}},
        "bi": {"backend": "bi-encoder", "options": {"model": "fake"}},
        "broken": {"backend": "cross-encoder", "required": False, "options": {"model": "/nonexistent/ce"}},
    }}
    procs = []
    try:
        for args in ((), ("--workers", "1")):  # the default worker count, then in-process
            proc = start(tmp_path_factory.mktemp("serve"), config, *args, ready=False)
            procs.append(proc)
        for proc in procs:
            wait_http(f"http://127.0.0.1:{proc.port}/.well-known/ready", 240, proc=proc)
        yield procs[0], procs[1]
    finally:
        for proc in procs:
            stop(proc)


def test_default_workers_with_a_cross_encoder_and_one_copy_in_the_engine(servers):
    engine_srv, solo = servers
    info = meta(engine_srv.port)
    engine = info["engine"]["pid"]
    kids = children(engine_srv.pid)
    assert engine in kids and len(kids) == DEFAULT_WORKERS + 1  # the default no longer drops to 1 worker
    # Only the engine has torch (the cross-encoder) mapped; in-process, the one worker has it.
    assert [pid for pid in kids if maps(pid, "libtorch")] == [engine]
    (solo_worker,) = children(solo.pid)
    assert maps(solo_worker, "libtorch") and meta(solo.port)["engine"]["mode"] == "in-process"
    # /meta's rerankers come from the engine's facts and read as the in-process ones do.
    assert info["rerankers"] == meta(solo.port)["rerankers"]
    assert info["rerankers"]["ce"]["state"] == "ready" and info["rerankers"]["co"]["state"] == "ready"
    assert info["rerankers"]["broken"]["state"] == "failed" and "cannot load" in info["rerankers"]["broken"]["error"]
    assert KEY not in json.dumps(info)


def test_scores_are_identical_to_in_process(servers, upstream):
    engine_srv, solo = servers
    calls = [
        ("/rerank", {"query": QUERY, "documents": DOCS, "property": ""}),
        ("/rerank", {"query": QUERY, "property": LONG}),
        ("/models/co/rerank", {"query": "fox jumps", "documents": DOCS, "property": ""}),
        ("/models/bi/rerank", {"query": QUERY, "documents": DOCS, "property": ""}),
        ("/v2/rerank", {"query": QUERY, "documents": DOCS, "model": "tiny", "return_documents": False}),
        ("/v1/rerank", {"query": "capital of france", "documents": DOCS, "model": "co"}),
    ]
    for path, body in calls:
        for _ in range(3):  # new connections: different HTTP workers of the engine server
            mine, theirs = post(engine_srv.port, path, body), post(solo.port, path, body)
            assert mine.status == theirs.status == 200, (path, mine.body)
            assert same(mine) == same(theirs), path
    # The hosted scores (float64, six decimals) came through unchanged.
    scores = post(engine_srv.port, "/models/co/rerank", calls[2][1]).json()["scores"]
    assert [s["score"] for s in scores] == [relevance("fox jumps", d) for d in DOCS]


def test_errors_are_the_same_json_errors(servers, upstream):
    engine_srv, solo = servers
    body = {"query": QUERY, "documents": DOCS, "property": ""}
    mine, theirs = post(engine_srv.port, "/models/broken/rerank", body), post(solo.port, "/models/broken/rerank", body)
    assert mine.status == theirs.status == 503 and mine.json() == theirs.json()
    assert "cannot load" in mine.json()["error"]
    upstream.always(status(400))
    try:
        for path, req in (("/models/co/rerank", body),
                          ("/v2/rerank", {"query": QUERY, "documents": DOCS, "model": "co"})):
            mine, theirs = post(engine_srv.port, path, req), post(solo.port, path, req)
            assert mine.status == theirs.status == 502, mine.body
            assert mine.headers["content-type"] == "application/json" and same(mine) == same(theirs)
            assert b"Traceback" not in mine.body and KEY.encode() not in mine.body
        assert "cohere upstream returned 400" in mine.json()["message"]  # Cohere-shaped on /v2/rerank
    finally:
        upstream.always(None)


def test_engine_killed_reranking_answers_json_503_then_recovers(servers):
    engine_srv, solo = servers
    body = {"query": QUERY, "documents": DOCS, "property": ""}
    want = post(solo.port, "/rerank", body).json()
    engine = meta(engine_srv.port)["engine"]["pid"]
    os.kill(engine, signal.SIGKILL)  # a child of the server this test started

    def refused():
        r = post(engine_srv.port, "/rerank", body)
        cohere = post(engine_srv.port, "/v2/rerank", {"query": QUERY, "documents": DOCS, "model": "ce"})
        return (r, cohere) if r.status == cohere.status == 503 else None

    got = wait_for(refused, 20)
    assert got is not None, "no 503 while the engine was down"
    r, cohere = got
    assert r.headers["content-type"] == "application/json" and "engine" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1
    assert "engine" in cohere.json()["message"] and int(cohere.headers["retry-after"]) >= 1

    def back():
        m = meta(engine_srv.port)
        return m if m["engine"]["up"] and m["engine"]["pid"] not in (None, engine) \
            and m["rerankers"]["ce"]["state"] == "ready" else None

    assert wait_for(back, 120, 0.2) is not None, "the engine was not restarted"
    assert not alive(engine)
    r = post(engine_srv.port, "/rerank", body)
    assert r.status == 200 and r.json() == want


def test_hup_reload_swaps_the_rerankers_engine_with_zero_failed_requests(tmp_path_factory):
    """HUP under rerank traffic: no failed request, and the new engine serves the reloaded reranker config."""
    models = tmp_path_factory.mktemp("tiny-ces")
    first, second = (str(save_tiny_cross_encoder(models / f"seed{s}", seed=s)) for s in (0, 1))
    config = {**fake_model(), "cache": {"enabled": False}, "default_reranker": "ce", "rerankers": {
        "ce": {"backend": "cross-encoder", "options": {"model": first}},
        "other": {"backend": "cross-encoder", "options": {"model": second}},
    }}
    home = tmp_path_factory.mktemp("serve-hup")
    proc = start(home, config, "--workers", "2", ready=False)
    try:
        wait_http(f"http://127.0.0.1:{proc.port}/.well-known/ready", 240, proc=proc)
        body = {"query": QUERY, "documents": DOCS, "property": ""}
        old_answer = post(proc.port, "/rerank", body)
        # What `ce` must answer once it names the second model: `other`'s scores today.
        new_answer = post(proc.port, "/models/other/rerank", body)
        assert old_answer.status == new_answer.status == 200
        assert old_answer.json() != new_answer.json(), "the two tiny models score alike: the check would prove nothing"
        old_engine = meta(proc.port)["engine"]["pid"]

        def rerank(i, n):
            return post(proc.port, "/rerank", {**body, "query": f"{QUERY} {i} {n}"}).status

        def edit(cfg):
            cfg["rerankers"]["ce"]["options"]["model"] = second

        def swapped():
            m = meta(proc.port)
            return m["engine"]["pid"] not in (None, old_engine) and m["rerankers"]["ce"]["state"] == "ready" \
                and same(post(proc.port, "/rerank", body)) == same(new_answer)

        after, statuses = hup_under_load(proc, home / "vecshim.yaml", edit, rerank, swapped, clients=6, timeout=120)
        assert after, "after HUP /rerank did not answer from a new engine with the reloaded model"
        during = len(statuses)
        assert during > 20 and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
        assert wait_for(lambda: not alive(old_engine), 60, 0.2), "the old engine kept running"
        for _ in range(4):  # new connections, any worker: all answer with the new model, from the new engine
            r = post(proc.port, "/rerank", body)
            assert r.status == 200 and same(r) == same(new_answer)
        new_engine = meta(proc.port)["engine"]["pid"]
        assert new_engine != old_engine and new_engine in children(proc.pid)
        assert [pid for pid in children(proc.pid) if maps(pid, "libtorch")] == [new_engine]
    finally:
        stop(proc)
