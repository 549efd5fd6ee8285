"""The pure steps Model runs around its batcher: long-text units (vecshim.long_text) and the cache round trip."""
from __future__ import annotations

import numpy as np
import pytest

from fakebackend import FakeBackend
from vecshim.cache import MemoryCache, lookup_or_compute
from vecshim.errors import PayloadTooLarge
from vecshim.long_text import count_within_limit, merge_units, plan_units


class CountingFake(FakeBackend):
    """FakeBackend (a token is a word) that records the length of every text it counts."""

    name = "counting-fake"

    def __init__(self, options):
        super().__init__(options)
        self.counted: list[int] = []

    def count_tokens(self, texts):
        self.counted.extend(len(t) for t in texts)
        return super().count_tokens(texts)


def backend(max_input_tokens=None):
    return CountingFake(FakeBackend.Options(max_input_tokens=max_input_tokens))


def plan(b, texts, prefix, policy):
    inputs = [prefix + t for t in texts]
    return plan_units(b, texts, inputs, b.count_tokens(inputs), prefix, policy, "m")


def test_texts_within_the_limit_are_one_unit_each():
    units, tokens, spans = plan(backend(5), ["a b", "c"], "q: ", "chunk_mean")
    assert units == ["q: a b", "q: c"] and tokens == [3, 2] and spans == [(0, 1), (1, 2)]


def test_a_long_text_becomes_prefixed_windows_or_its_first_or_a_413():
    text = " ".join(f"w{i}" for i in range(10))
    units, tokens, spans = plan(backend(4), [text, "x"], "q: ", "chunk_mean")
    # The prefix takes one of the four tokens: windows of three words, each prefixed.
    assert units == ["q: w0 w1 w2", "q: w3 w4 w5", "q: w6 w7 w8", "q: w9", "q: x"]
    assert tokens == [4, 4, 4, 2, 2] and spans == [(0, 4), (4, 5)]
    units, _, spans = plan(backend(4), [text], "q: ", "truncate")
    assert units == ["q: w0 w1 w2"] and spans == [(0, 1)]
    with pytest.raises(PayloadTooLarge, match="text has 11 tokens; model 'm' reads at most 4"):
        plan(backend(4), [text], "q: ", "error")


def test_windows_merge_as_a_token_weighted_mean():
    vecs = [np.array([1, 0], np.float32), np.array([0, 1], np.float32), np.array([3, 4], np.float32)]
    merged = merge_units(vecs, [3, 1, 5], [(0, 2), (2, 3)], normalized=False, normalize=None)
    assert np.allclose(merged[0], [0.75, 0.25]) and np.allclose(merged[1], [3, 4])
    unit = merge_units(vecs, [3, 1, 5], [(0, 2), (2, 3)], normalized=True, normalize=None)
    assert np.allclose(unit[0], np.array([3, 1]) / np.sqrt(10)) and np.allclose(unit[1], [3, 4])  # one unit: as given
    assert np.allclose(merge_units(vecs, [3, 1, 5], [(0, 2), (2, 3)], False, True)[1], [0.6, 0.8])
    assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in merged)


def test_an_oversize_request_is_refused_after_counting_a_bounded_prefix():
    b = backend()
    assert count_within_limit(b, ["a b", "c d e"], 5, "m") == [2, 3]
    huge = "word " * 200_000  # a megabyte: counting all of it would be the slow part
    b.counted.clear()
    with pytest.raises(PayloadTooLarge, match="request has more than 10 tokens; model 'm' accepts at most 10"):
        count_within_limit(b, ["a", huge], 10, "m")
    assert max(b.counted) <= 11 * 6  # (limit + 1) x 6 characters were enough to prove it


def test_the_cache_round_trip_computes_only_misses_and_keys_by_size():
    cache, computed, lookups = MemoryCache(100, 1 << 20), [], []

    def compute(texts):
        computed.append(list(texts))
        return [np.full(4, len(t), np.float32) for t in texts]

    def serve(texts, dims=None):
        return lookup_or_compute(cache, texts, "space0123456789a", None, dims, dims or 4, compute,
                                 lambda hits, misses: lookups.append((hits, misses)))

    first = serve(["a", "bb"])
    again = serve(["bb", "ccc"])
    assert computed == [["a", "bb"], ["ccc"]] and lookups == [(0, 2), (1, 1)]
    assert np.array_equal(again[0], first[1]) and np.array_equal(again[1], np.full(4, 3))
    serve(["a"], dims=2)  # another served size is another entry
    assert computed[-1] == ["a"] and lookups[-1] == (0, 1)
    assert lookup_or_compute(None, ["a"], "s", None, None, 4, compute)[0].tolist() == [1, 1, 1, 1]  # no cache
    assert computed[-1] == ["a"] and len(computed) == 4
