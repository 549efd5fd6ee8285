"""The engine channel's rerank frames over a real socket pair: exact scores, errors as vecshim's classes."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from vecshim.engine import channel
from vecshim.errors import BackendUnavailable, UpstreamError, VecshimError


def roundtrip(body: bytes) -> bytes:
    a, b = socket.socketpair()
    with a, b:
        channel.send(a, body)
        return channel.recv(b)


def test_rank_request_carries_the_query_then_every_document():
    docs = ["", "Ünïcödé 漢字 🚀", "x" * 70_000, "\ud800 lone surrogate"]
    kind, name, _, _, texts = channel.unpack_texts(roundtrip(channel.pack_rank("ce", "which animal?", docs)))
    assert (kind, name, texts) == (b"R", "ce", ["which animal?", *docs])


@pytest.mark.parametrize("scores, small", [
    (np.array([0.25, -3.5, 0.1], dtype=np.float32).astype(np.float64), True),  # a local model's float32 scores
    (np.array([0.123456, 0.9, 1e-300]), False),                               # a hosted API's decimals
])
def test_scores_come_back_exactly(scores, small):
    body = roundtrip(channel.pack_scores(scores))
    assert body[:2] == (b"Sf" if small else b"Sd")
    got = channel.unpack_scores(body)
    assert got.dtype == np.float64 and got.tolist() == scores.tolist()


def test_no_scores_for_no_documents():
    assert channel.unpack_scores(roundtrip(channel.pack_scores(np.zeros(0)))).tolist() == []


def test_errors_cross_as_the_same_class_without_a_traceback():
    err = channel.unpack_error(roundtrip(channel.pack_error(
        BackendUnavailable("reranker 'ce' is not ready", headers={"Retry-After": "1"}))))
    assert type(err) is BackendUnavailable and err.status == 503 and err.headers == {"Retry-After": "1"}
    err = channel.unpack_error(roundtrip(channel.pack_error(UpstreamError("cohere upstream returned 400"))))
    assert type(err) is UpstreamError and err.status == 502 and err.message == "cohere upstream returned 400"
    assert err.retryable is False and err.upstream_status is None  # the engine retried already
    body = roundtrip(channel.pack_error(KeyError("secret-ish detail")))
    err = channel.unpack_error(body)
    assert type(err).__name__ == "BackendError" and isinstance(err, VecshimError) and err.status == 502
    assert b"secret-ish" not in body and b"Traceback" not in body and "KeyError" in err.message
