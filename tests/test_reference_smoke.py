"""The checks of the reference container's smoke suites, against a real `vecshim serve` with no config.

weaviate/t2v-transformers-models runs `smoke_test.py` (9 tests) and
`smoke_validate_cache_test.py` (2 tests) against its image. These are the same
11 checks (same texts, URLs, request bodies, repetitions and assertions),
written for pytest, one test each, against the bundled model.
"""
from __future__ import annotations

import http.client
import json
import random
import threading

import numpy as np
import pytest

from conftest import vecshim_serve

pytestmark = pytest.mark.slow

SENTENCES = [
    "Python is easy to learn.",
    "AI can enhance decision-making processes.",
    "SpaceX is revolutionizing space travel.",
    "Python excels in data analysis.",
    "AI algorithms learn from data.",
    "Mars rovers explore new terrains.",
    "Python supports multiple programming paradigms.",
    "AI improves user experience on websites.",
    "The International Space Station orbits Earth.",
    "Python's syntax is very readable.",
    "AI in healthcare can predict outcomes.",
    "Astronauts conduct experiments in space.",
    "Python is widely used in web development.",
    "Machine learning is a subset of AI.",
    "NASA aims to return humans to the Moon.",
    "Python libraries simplify complex tasks.",
    "Autonomous vehicles rely on AI technologies.",
    "Voyager 1 has left our solar system.",
    "Python is open-source and community-driven.",
    "Voice assistants use AI to understand speech.",
    "Telescopes help in observing distant galaxies.",
    "Python's popularity grows each year.",
    "AI can identify patterns in big data.",
    "Satellites provide crucial weather data.",
    "Python can run on many operating systems.",
    "Neural networks mimic human brain functions.",
    "Space debris is a growing concern in orbit.",
    "Python scripts automate repetitive tasks.",
    "AI ethics is a growing field of study.",
    "The Hubble Space Telescope has changed our view of the cosmos.",
]
LONDON = "The London Eye is a ferris wheel at the River Thames."
FACTS = ["Vector database for semantic search.", "Supports similarity-based queries.",
         "Integrates with ML for classification."]


@pytest.fixture(scope="module")
def port():
    """`vecshim serve` with no config file: the bundled model, as the reference image serves its own."""
    with vecshim_serve(env={"VECSHIM_CONFIG": ""}, ready_timeout=180) as (_, p):
        yield p


class Client:
    """One keep-alive connection, like the `requests` session-less calls of the reference suite."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, data, headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def vectorize(self, path: str, text: str, task_type: str = "", dimensions: int | None = None):
        """The reference `_try_to_vectorize`: 200 and a vector longer than 100."""
        body: dict = {"text": text}
        if task_type or dimensions is not None:
            body["config"] = {**({"task_type": task_type} if task_type else {}),
                              **({"dimensions": dimensions} if dimensions is not None else {})}
        status, raw = self.call("POST", path, body)
        reply = json.loads(raw)
        assert status == 200, reply
        assert len(reply["vector"]) > 100
        return reply["vector"]

    def sentences(self, task_type: str = ""):
        for s in SENTENCES:
            self.vectorize("/vectors/", s, task_type)
            self.vectorize("/vectors", s, task_type)

    def close(self):
        self.conn.close()


def in_threads(port: int, n: int, fn) -> None:
    errors: list[BaseException] = []

    def run():
        c = Client(port)
        try:
            fn(c)
        except BaseException as err:  # collected and re-raised in the test thread
            errors.append(err)
        finally:
            c.close()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


@pytest.fixture
def client(port):
    c = Client(port)
    yield c
    c.close()


# -- smoke_test.py ------------------------------------------------------------------

def test_well_known_ready(client):
    assert client.call("GET", "/.well-known/ready")[0] == 204


def test_well_known_live(client):
    assert client.call("GET", "/.well-known/live")[0] == 204


def test_meta(client):
    status, raw = client.call("GET", "/meta")
    assert status == 200 and isinstance(json.loads(raw), dict)


def test_vectorizing(client):
    client.vectorize("/vectors/", LONDON)
    assert len(client.vectorize("/vectors", LONDON)) == 384


def test_vectorizing_sentences_parallel(port):
    in_threads(port, 10, lambda c: c.sentences())


def test_vectorizing_sentences(client):
    for _ in range(10):
        client.sentences()


def test_vectorizing_sentences_with_task_type_parallel(client):
    # The reference calls its target while building each thread, so its 10 rounds run in turn.
    for _ in range(10):
        client.sentences(random.choice(["query", "passage"]))


def test_vectorizing_with_task_type(client):
    client.vectorize("/vectors/", LONDON, "passage")
    client.vectorize("/vectors", LONDON, "query")


def test_vectorizing_with_task_type_and_dimensions(client):
    v256 = client.vectorize("/vectors/", LONDON, "passage", dimensions=256)
    v128 = client.vectorize("/vectors", LONDON, "query", dimensions=128)
    assert (len(v256), len(v128)) == (256, 128)
    assert abs(np.linalg.norm(v256) - 1) < 1e-5 and abs(np.linalg.norm(v128) - 1) < 1e-5


# -- smoke_validate_cache_test.py ---------------------------------------------------

def test_vectorize_payload_with_config(client):
    for _ in range(10):
        for fact in FACTS:
            client.vectorize("/vectors/", fact, "query")
            client.vectorize("/vectors", fact, "passage")


def test_vectorizing_cached_results(client, port):
    before = {s: client.vectorize("/vectors/", s) for s in SENTENCES}
    in_threads(port, 10, lambda c: c.sentences())
    after = {s: client.vectorize("/vectors/", s) for s in SENTENCES}
    for s in SENTENCES:
        assert before[s] == after[s], s
