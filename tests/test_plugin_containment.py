"""A plugin that raises, hangs or returns garbage costs one JSON error; other models keep serving."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from vecshim import Backend, hookimpl

#: Released by the test's teardown so hung batch workers exit.
RELEASE = threading.Event()


class Misbehaving(Backend):
    """Embeds normally, except for texts that name a misbehaviour."""

    name = "misbehaving"

    def info(self):
        return {"model": "misbehaving-3d"}

    def embed(self, texts, task):
        good = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]][: len(texts)] + [[0.0, 0.0, 1.0]] * max(0, len(texts) - 2)
        joined = " ".join(texts)
        if "raise" in joined:
            raise RuntimeError("plugin bug with internal detail sk-hidden-123")
        if "hang" in joined:
            RELEASE.wait(30)
            return good
        if "count" in joined:
            return good[:-1]
        if "strings" in joined:
            return [["a", "b", "c"] for _ in texts]
        if "nan" in joined:
            return [[float("nan"), 0.0, 1.0] for _ in texts]
        if "ragged" in joined:
            return [[1.0, [0.0, 1.0], 0.0] for _ in texts]  # not a flat row of numbers
        if "length" in joined:
            return [[1.0, 0.0] for _ in texts]
        if "none" in joined:
            return None
        return good


class MisbehavingPlugin:
    @hookimpl
    def register_backends(self, register):
        register(Misbehaving)


CONFIG = {
    "models": {
        "bad": {"backend": "misbehaving", "timeout_s": 1, "batch": {"workers": 2},
                "retry": {"max_attempts": 1}, "circuit": {"failures": 1000}},
        "good": {"backend": "fake", "options": {"dim": 8}},
    },
    "cache": {"enabled": False},
}


@pytest.fixture
def app(serve):
    RELEASE.clear()
    yield serve(CONFIG, plugins=[MisbehavingPlugin()])
    RELEASE.set()


def assert_other_model_serves(client):
    reply = client.vectors("still fine", base="/models/good")
    assert reply.status == 200
    assert len(reply.json()["vector"]) == 8


@pytest.mark.parametrize("trigger", ["count", "strings", "nan", "ragged", "length", "none"])
def test_garbage_is_a_502(app, trigger):
    client = app.client()
    reply = client.vectors(f"please {trigger}", base="/models/bad")
    assert reply.status == 502, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert "misbehaving" in reply.json()["error"]
    assert_other_model_serves(client)
    assert client.vectors("a normal text", base="/models/bad").status == 200


def test_hang_past_timeout_is_a_504(app):
    client = app.client()
    reply = client.vectors("please hang", base="/models/bad")
    assert reply.status == 504
    assert reply.json()["error"] == "model 'bad' did not answer within 1 s"
    assert_other_model_serves(client)
    # One worker is stuck; the model's other worker still answers.
    assert client.vectors("a normal text", base="/models/bad").status == 200


def test_exception_is_contained(app):
    client = app.client()
    reply = client.vectors("please raise", base="/models/bad")
    assert reply.status >= 500
    error = reply.json()["error"]
    assert "RuntimeError" in error and "sk-hidden-123" not in error
    assert_other_model_serves(client)
    assert client.vectors("a normal text", base="/models/bad").status == 200


def test_exception_is_a_502(app):
    assert app.client().vectors("please raise", base="/models/bad").status == 502


def test_vectors_from_the_well_behaved_path_are_exact(app):
    reply = app.client().vectors("fine", base="/models/bad")
    assert np.allclose(reply.json()["vector"], [1.0, 0.0, 0.0])
