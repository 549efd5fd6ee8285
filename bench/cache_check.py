"""Cost of checking cached vectors (issue 13), and what a memory cache of row views retains.

1. Redis values: `decode_value` (header, space, dimension, length, finiteness)
   against the raw limit, a bare `np.frombuffer` of the same bytes.
2. Memory: 300 batch matrices of 256 x 384 float32, one row of each stored
   in a MemoryCache bounded to 200 vectors; tracemalloc's retained bytes for
   owned copies (what the cache stores) and for row views (what it stored before).

Run: flock /tmp/vecshim-bench.lock .venv/bin/python bench/cache_check.py
"""
from __future__ import annotations

import os
import timeit
import tracemalloc
from collections import OrderedDict

import numpy as np

from vecshim.cache import MemoryCache, decode_value, encode_value

SPACE = "0123456789abcdef"


def decode_cost(dim: int = 384, n: int = 20000) -> tuple[float, float]:
    raw = encode_value(SPACE, np.random.default_rng(0).standard_normal(dim).astype(np.float32))
    checked = timeit.timeit(lambda: decode_value(raw, SPACE, dim), number=n) / n
    bare = timeit.timeit(lambda: np.frombuffer(raw, dtype=np.float32, offset=32), number=n) / n
    return checked, bare


class _Views(MemoryCache):
    """The previous store: the row as given (a view pinning its batch)."""

    def set_many(self, items, *, space=None):
        with self._lock:
            for k, v in items:
                self._data[k] = v
                self._bytes += v.nbytes
            while len(self._data) > self.max_items or self._bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._bytes -= old.nbytes


def retained(cls, dim: int = 384, rows: int = 256, batches: int = 300, keep: int = 200) -> int:
    cache = cls(max_items=1_000_000, max_bytes=keep * dim * 4)
    cache._data = OrderedDict()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for b in range(batches):
        matrix = np.random.default_rng(b).standard_normal((rows, dim)).astype(np.float32)
        cache.set_many([(str(b).encode(), matrix[b % rows])])
        del matrix
    out = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return out


def main() -> None:
    print(f"loadavg before: {os.getloadavg()}")
    checked, bare = decode_cost()
    print(f"redis value check: {checked * 1e6:.2f} us/value, bare frombuffer {bare * 1e6:.2f} us/value, "
          f"ratio {checked / bare:.1f}")
    bound = 200 * 384 * 4
    owned, views = retained(MemoryCache), retained(_Views)
    print(f"memory cache bound {bound} B: owned copies retain {owned} B ({owned / bound:.2f}x bound); "
          f"row views retain {views} B ({views / bound:.0f}x bound)")
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
