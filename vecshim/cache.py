"""Vector caches: an in-process LRU and an optional Redis shared by replicas.

Redis values are not trusted: each carries a header naming the vector space
(model fingerprint), dimension and dtype it was made for, and is checked for
that, its length and finiteness before use. A value that fails is dropped
(a miss, recomputed and overwritten) and counted.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

__all__ = ["MemoryCache", "RedisCache", "TieredCache", "cache_key", "build_cache", "encode_value", "decode_value",
           "lookup_or_compute"]

log = logging.getLogger("vecshim.cache")

#: Value header: magic, space id (16 ASCII hex), dimension, dtype.
_HEADER = struct.Struct("<8s16sI4s")
_MAGIC = b"vecshim2"
_DTYPE = b"<f4\x00"


def cache_key(fingerprint: str, task: str | None, dimensions: int | None, text: str) -> bytes:
    """Key for one vector: vector space (fingerprint), task, served size and a hash of the text."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{fingerprint}\x00{task or '-'}\x00{dimensions or 0}\x00".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return b"vecshim:v2:" + h.hexdigest().encode()


def lookup_or_compute(cache, texts: Sequence[str], space: str, task: str | None, dimensions: int | None,
                      size: int | None, compute: Callable[[list[str]], list[np.ndarray]],
                      on_lookup: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Vectors for `texts` as served: what `cache` holds for exactly this space, task and size, and
    `compute(missing texts)` for the rest, which are then stored (`cache` None: compute them all).

    `dimensions` is the requested size (None: the native one), `size` the length
    served; `on_lookup(hits, misses)` counts each lookup.
    """
    out: list[np.ndarray | None] = [None] * len(texts)
    keys = None
    if cache is not None:
        keys = [cache_key(space, task, dimensions, t) for t in texts]
        out = cache.get_many(keys, space=space, dimension=size)
        if on_lookup is not None:
            hits = sum(v is not None for v in out)
            on_lookup(hits, len(texts) - hits)
    todo = [i for i, v in enumerate(out) if v is None]
    if todo:
        for i, v in zip(todo, compute([texts[i] for i in todo])):
            out[i] = v
        if cache is not None:
            cache.set_many([(keys[i], out[i]) for i in todo], space=space)
    return out


def encode_value(space: str, vector: np.ndarray) -> bytes:
    """A Redis value: header plus the float32 bytes."""
    v = np.ascontiguousarray(vector, dtype="<f4")
    return _HEADER.pack(_MAGIC, space.encode("ascii")[:16].ljust(16, b"-"), v.shape[0], _DTYPE) + v.tobytes()


def decode_value(raw: bytes, space: str, dimension: int | None) -> tuple[np.ndarray | None, str | None]:
    """(vector, None) if `raw` is a finite vector of `dimension` made for `space`, else (None, reason)."""
    if len(raw) < _HEADER.size:
        return None, "short"
    magic, sid, dim, dtype = _HEADER.unpack_from(raw)
    if magic != _MAGIC or dtype != _DTYPE:
        return None, "format"
    if sid != space.encode("ascii")[:16].ljust(16, b"-"):
        return None, "space"
    if dimension is None or dim != dimension or len(raw) != _HEADER.size + 4 * dim:
        return None, "length"
    v = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).astype(np.float32)  # a copy it owns
    if not np.isfinite(v).all():
        return None, "non_finite"
    return v, None


class MemoryCache:
    """Thread-safe LRU of float32 vectors, bounded by item count and bytes."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes of vectors held (each owns its memory, so this is what they retain)."""
        return self._bytes

    def get_many(self, keys: Sequence[bytes], *, space: str | None = None,
                 dimension: int | None = None) -> list[np.ndarray | None]:
        """Return the cached vector or None for each key, refreshing recency."""
        out = []
        with self._lock:
            for k in keys:
                v = self._data.get(k)
                if v is not None:
                    if dimension is not None and v.shape[0] != dimension:
                        v = None  # keys carry the size; a mismatch would be a bug, never served
                    else:
                        self._data.move_to_end(k)
                out.append(v)
        return out

    def set_many(self, items: Sequence[tuple[bytes, np.ndarray]], *, space: str | None = None) -> None:
        """Store copies of vectors, evicting the least recently used beyond the bounds.

        A row of a batch matrix is a view that keeps the whole matrix alive;
        the copy owns just its own bytes, so the byte bound is what is retained.
        """
        if self.max_items <= 0 or self.max_bytes <= 0:
            return
        items = [(k, np.array(v, dtype=np.float32, copy=True)) for k, v in items]
        with self._lock:
            for k, v in items:
                old = self._data.pop(k, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._data[k] = v
                self._bytes += v.nbytes
            while self._data and (len(self._data) > self.max_items or self._bytes > self.max_bytes):
                _, v = self._data.popitem(last=False)
                self._bytes -= v.nbytes


class RedisCache:
    """Redis-backed cache; any Redis failure is logged, counted and treated as a miss.

    After a failure Redis is skipped for `backoff_s` so a dead Redis adds no
    latency to every request.
    """

    def __init__(self, url: str, *, ttl_s: int | None, timeout_s: float,
                 backoff_s: float = 2.0, on_error: Callable[[], None] | None = None,
                 on_reject: Callable[[str], None] | None = None):
        try:
            import redis
        except ImportError:
            from .errors import ConfigError
            raise ConfigError("cache.redis_url needs: pip install 'vecshim[redis]'") from None
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=30)
        self._errors = (redis.RedisError, OSError)
        self.ttl_s = ttl_s
        self.backoff_s = backoff_s
        self._down_until = 0.0
        self._on_error = on_error
        self._on_reject = on_reject
        self.errors = 0
        self.rejected = 0

    def _failed(self, err: Exception) -> None:
        self.errors += 1
        if self._on_error:
            self._on_error()
        if time.monotonic() >= self._down_until:
            # Log once per backoff window, with the error class only: the
            # message may echo the URL and its password.
            log.warning("redis cache unavailable (%s); serving from the model", type(err).__name__)
        self._down_until = time.monotonic() + self.backoff_s

    def get_many(self, keys: Sequence[bytes], *, space: str, dimension: int | None) -> list[np.ndarray | None]:
        """Return checked vectors for the keys found in Redis, None elsewhere (and for bad values)."""
        if not keys or time.monotonic() < self._down_until:
            return [None] * len(keys)
        try:
            raw = self._redis.mget(keys)
        except self._errors as err:
            self._failed(err)
            return [None] * len(keys)
        out = []
        for r in raw:
            v = None
            if r is not None:
                v, reason = decode_value(r, space, dimension)
                if reason is not None:
                    self._rejected(reason, len(r))
            out.append(v)
        return out

    def _rejected(self, reason: str, size: int) -> None:
        self.rejected += 1
        if self._on_reject:
            self._on_reject(reason)
        log.warning("redis cache value rejected (%s, %d bytes); recomputing", reason, size)

    def set_many(self, items: Sequence[tuple[bytes, np.ndarray]], *, space: str) -> None:
        """Store vectors with their header (and the TTL, if set); failures are swallowed after logging."""
        if not items or time.monotonic() < self._down_until:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for k, v in items:
                pipe.set(k, encode_value(space, v), ex=self.ttl_s)
            pipe.execute()
        except self._errors as err:
            self._failed(err)

    def close(self) -> None:
        """Close the connection pool."""
        self._redis.close()


class TieredCache:
    """Memory first, then Redis; Redis hits are copied into memory."""

    def __init__(self, memory: MemoryCache | None, redis: RedisCache | None):
        self.memory = memory
        self.redis = redis

    def get_many(self, keys: Sequence[bytes], *, space: str, dimension: int | None) -> list[np.ndarray | None]:
        """Look keys up in memory, then the misses in Redis (checked for `space` and `dimension`)."""
        found = (self.memory.get_many(keys, dimension=dimension) if self.memory is not None
                 else [None] * len(keys))
        if self.redis is not None:
            missing = [i for i, v in enumerate(found) if v is None]
            if missing:
                got = self.redis.get_many([keys[i] for i in missing], space=space, dimension=dimension)
                back = []
                for i, v in zip(missing, got):
                    if v is not None:
                        found[i] = v
                        back.append((keys[i], v))
                if back and self.memory is not None:
                    self.memory.set_many(back)
        return found

    def set_many(self, items: Sequence[tuple[bytes, np.ndarray]], *, space: str) -> None:
        """Store in every tier."""
        if self.memory is not None:
            self.memory.set_many(items)
        if self.redis is not None:
            self.redis.set_many(items, space=space)

    def close(self) -> None:
        """Close the Redis connection, if any."""
        if self.redis is not None:
            self.redis.close()


def build_cache(cfg, on_redis_error: Callable[[], None] | None = None,
                on_reject: Callable[[str], None] | None = None) -> TieredCache | None:
    """Build the cache from a CacheConfig, or None when caching is off."""
    if not cfg.enabled:
        return None
    memory = None
    if cfg.memory_items > 0 and cfg.memory_mb > 0:
        memory = MemoryCache(cfg.memory_items, int(cfg.memory_mb * 1024 * 1024))
    redis = None
    if cfg.redis_url:
        redis = RedisCache(cfg.redis_url, ttl_s=cfg.ttl_s, timeout_s=cfg.redis_timeout_s,
                           on_error=on_redis_error, on_reject=on_reject)
    if memory is None and redis is None:
        return None
    return TieredCache(memory, redis)
