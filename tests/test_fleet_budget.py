"""Hosted models at their upstream's rate limits, end to end: Weaviate-style clients ->
vecshim over HTTP -> the real openai/cohere SDKs -> fake upstreams on 127.0.0.1 that
enforce limits and send the providers' rate-limit headers; the fleet budget in a real
redis-server, killed mid-run in one test."""
from __future__ import annotations

import json
import math
import threading
import time

import pytest

from redisserver import RedisServer
from tests.fakes import status
from tests.fakes.cohere_upstream import FakeCohere
from tests.fakes.openai_upstream import FakeOpenAI

KEY = "sk-fleet-SECRET-0123456789abcdef"
CO_KEY = "co-fleet-SECRET-0123456789abcdef"


def openai_model(fake, **extra) -> dict:
    """Only what a team writes: backend, model, key, base_url (plus the test's extras)."""
    return {"backend": "openai", **extra,
            "options": {"model": "text-embedding-3-small", "base_url": fake.url + "/v1", "api_key": KEY}}


def config(models: dict, **top) -> dict:
    return {"models": models, "cache": {"enabled": False}, **top}


def clients(s, n: int, texts_each: int, words: int = 3) -> tuple[list, float]:
    """`n` Go-style clients send `texts_each` unique texts back to back; return (replies, seconds)."""
    replies, lock = [], threading.Lock()

    def run(c: int):
        client = s.client()
        for i in range(texts_each):
            text = " ".join([f"client{c}", f"text{i}"] + ["word"] * (words - 2))
            reply = client.vectors(text)
            with lock:
                replies.append((text, reply))
    threads = [threading.Thread(target=run, args=(c,)) for c in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return replies, time.monotonic() - start


def assert_all_vectors(fake, replies, salt=""):
    bad = [(t, r.status, r.body[:200]) for t, r in replies if r.status != 200]
    assert not bad, bad[:3]
    for text, reply in replies:
        assert reply.json()["vector"] == pytest.approx(fake.vector(text, salt), abs=1e-6)


def calls(fake) -> list:
    return [r for r in fake.requests if r.method == "POST"]


def test_texts_pile_up_while_the_budget_has_no_room_and_a_lone_text_goes_at_once(serve):
    with FakeOpenAI(api_key=KEY, send_limits=False) as fake:
        # 60 calls/min known from config: about one call per 1.1 s (90 % headroom).
        s = serve(config({"m": openai_model(fake, rate_limit={"requests_per_minute": 60})}))
        time.sleep(1.2)  # the warm-up call's slot has passed: the upstream is idle
        fake.clear()
        assert s.client().vectors("lone text").status == 200
        assert [len(r.body["input"]) for r in calls(fake)] == [1]  # went alone, without waiting for company
        fake.clear()
        replies, seconds = clients(s, 20, 1)
        assert_all_vectors(fake, replies)
        sizes = [len(r.body["input"]) for r in calls(fake)]
        assert sum(sizes) == 20 and max(sizes) > 1
        # Calls never outpace the budget: the 20 texts rode in as few calls as the time allowed.
        assert len(sizes) <= 1 + math.ceil(seconds / (60 / 60 / 0.9)) + 1, (sizes, seconds)


def test_limits_learned_from_headers_pace_calls_under_the_limit_and_show_in_meta(serve):
    # 5 calls/s, announced as 300/min: 16 clients must see no 429 once the limit is known.
    with FakeOpenAI(api_key=KEY, latency_s=0.02, rate_limit=5) as fake:
        s = serve(config({"m": openai_model(fake)}))
        client = s.client()
        assert client.vectors("learn the limit").status == 200
        meta = client.request("GET", "/meta").json()["model"]["rate_budget"]
        assert meta["learned"]["requests_per_minute"] == 300 and meta["limits_per_minute"]["requests"] == 300
        assert meta["store"] == "process" and KEY not in json.dumps(meta)
        time.sleep(1.1)
        fake.clear()
        replies, seconds = clients(s, 16, 4)
        assert_all_vectors(fake, replies)
        assert fake.limited == 0
        assert len(calls(fake)) <= 1 + 5 * 0.9 * (seconds + 0.05) + 1
        metrics = client.request("GET", "/metrics").body.decode()
        assert 'vecshim_budget_limit_per_minute{kind="requests",upstream="127.0.0.1:' in metrics
        assert "vecshim_upstream_call_texts_bucket" in metrics and "vecshim_upstream_concurrency_limit" in metrics
        assert KEY not in metrics


def test_an_upstream_at_3_calls_per_s_without_headers_costs_no_client_errors(serve):
    # The report: 502 "rate limited after 5 attempts in 1.0 s" with 40 s of budget left.
    with FakeOpenAI(api_key=KEY, latency_s=0.05, rate_limit=3, send_limits=False, retry_after="0.2") as fake:
        s = serve(config({"m": openai_model(fake)}))
        replies, _ = clients(s, 24, 3)
        assert_all_vectors(fake, replies)
        assert fake.limited > 0  # the upstream did push back; retries absorbed it


def test_tokens_per_minute_are_paced_and_settled_with_the_real_count(serve):
    # 30000 tokens/min (words here); vecshim estimates from characters and corrects with `usage`.
    # The load's dimension check (a ~1,800-token passage) is paced too: at 3000/min it alone
    # took 26 s. The clients send 1,800 words, 4x what the pace lets through in its 1 s burst.
    with FakeOpenAI(api_key=KEY, tokens_per_minute=30000) as fake:
        s = serve(config({"m": openai_model(fake, rate_limit={"tokens_per_minute": 30000})}))
        fake.clear()
        replies, seconds = clients(s, 12, 15, words=10)
        assert_all_vectors(fake, replies)
        assert fake.limited == 0
        # What the upstream accepted stays within the pace: 450 tokens/s plus a 1 s burst and one
        # call per client. Unpaced, all 1,800 words would go in well under a second.
        assert fake.tokens_accepted == 12 * 15 * 10
        assert fake.tokens_accepted <= 450 * (seconds + 1) + 10 * 12
        meta = s.client().request("GET", "/meta").json()["model"]["rate_budget"]
        assert meta["limits_per_minute"]["tokens"] == 30000


def test_a_429_with_retry_after_holds_every_model_on_the_account(serve):
    with FakeOpenAI(api_key=KEY) as fake:
        s = serve(config({"a": openai_model(fake), "b": openai_model(fake)}))
        fake.clear()
        fake.inject(status(429, retry_after=1))
        client = s.client()
        threading.Thread(target=client.vectors, args=("first",)).start()  # model a, the default
        time.sleep(0.3)
        other = s.client().request("POST", "/v1/embeddings",
                                   json.dumps({"model": "b", "input": "second"}).encode(),
                                   {"Content-Type": "application/json"})
        assert other.status == 200, other.body
        first_429 = calls(fake)[0].at
        later = [r.at for r in calls(fake)[1:]]
        assert later and min(later) - first_429 >= 0.9  # nobody on the account called during the pause


def test_cohere_trial_limit_is_learned_and_billed_tokens_settle(serve, tmp_path):
    key_file = tmp_path / "co.key"
    key_file.write_text(CO_KEY)
    with FakeCohere(api_key=CO_KEY, rate_limit=10) as fake:
        s = serve(config({"co": {"backend": "cohere", "options": {"base_url": fake.url,
                                                                 "api_key_file": str(key_file)}}}))
        replies, _ = clients(s, 8, 2)
        assert_all_vectors(fake, replies, "search_document")
        meta = s.client().request("GET", "/meta").json()["model"]["rate_budget"]
        assert meta["learned"]["requests_per_minute"] == 600
        assert meta["upstream"] == "127.0.0.1:" + fake.url.rsplit(":", 1)[1]


@pytest.mark.slow
def test_redis_killed_mid_run_keeps_serving_on_a_loud_per_replica_share(serve, caplog):
    server = RedisServer().start()
    try:
        with FakeOpenAI(api_key=KEY, latency_s=0.02, rate_limit=20) as fake:
            s = serve(config({"m": openai_model(fake)},
                             budget={"redis_url": server.url, "expected_replicas": 2}))
            client = s.client()
            assert client.vectors("via redis").status == 200
            assert client.request("GET", "/meta").json()["model"]["rate_budget"]["store"] == "redis"
            replies, _ = clients(s, 8, 3)
            assert_all_vectors(fake, replies)
            server.kill()
            replies, _ = clients(s, 8, 3)
            assert_all_vectors(fake, replies)  # Redis gone: still no client error
            meta = client.request("GET", "/meta").json()["model"]["rate_budget"]
            assert meta["store"] == "process" and "1/2" in meta["fallback"]
            metrics = client.request("GET", "/metrics").body.decode()
            gauge = [line for line in metrics.splitlines() if line.startswith("vecshim_budget_fallback{")]
            assert gauge and gauge[0].endswith(" 1.0"), gauge
            assert any("Redis unreachable" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


def test_texts_of_concurrent_clients_share_calls_while_one_is_in_flight(serve):
    # No limit anywhere: the upstream always has room, and the window allows several
    # calls at once. Still, 16 closed-loop clients' texts must gather into a few full
    # calls (those that arrive while a call is in flight wait for it) instead of
    # leaving in many concurrent small ones.
    with FakeOpenAI(api_key=KEY, latency_s=0.4, send_limits=False) as fake:
        s = serve(config({"m": openai_model(fake)}))
        clients(s, 16, 2)  # warm-up: the batcher learns how many texts are outstanding
        fake.clear()
        replies, _ = clients(s, 16, 6)
        assert_all_vectors(fake, replies)
        sizes = [len(r.body["input"]) for r in calls(fake)]
        assert sum(sizes) == 96
        # Ideally 6 calls of 16; 16 calls (6 texts each on average) leaves room for stragglers
        # on a loaded machine. Sending as soon as the upstream has room made 38 calls here.
        assert len(sizes) <= 16, sizes
