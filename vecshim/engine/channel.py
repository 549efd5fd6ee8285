"""Framing between HTTP workers and the engine over a Unix domain socket.

Every message is a 4-byte big-endian length and a body whose first byte is
its kind. Texts travel as one UTF-8 blob plus their byte lengths; vectors come
back as raw float32 bytes (both ends share the machine, so its byte order), so
neither side builds per-number Python objects.

Requests:  E embed (model, task, texts) · C count tokens (model, texts) ·
           R rerank (reranker, query then documents) · W watch facts
Replies:   V vectors · N token counts · S scores · F facts (JSON) · X error (JSON)
"""
from __future__ import annotations

import json
import socket
import struct

import numpy as np

from ..errors import VecshimError
from .. import errors as _errors

__all__ = ["send", "recv", "pack_texts", "unpack_texts", "pack_vectors", "unpack_vectors",
           "pack_rank", "pack_scores", "unpack_scores", "pack_error", "unpack_error", "ChannelClosed",
           "TASK_CODES", "TASKS_BY_CODE"]

_LEN = struct.Struct("!I")
_HEAD = struct.Struct("!cBHHI")  # kind, task, model-name bytes, pooling-name bytes, text count
_SHAPE = struct.Struct("!II")    # rows, columns
TASK_CODES = {"passage": 0, "query": 1}
TASKS_BY_CODE = {v: k for k, v in TASK_CODES.items()}
MAX_FRAME = 1 << 30


class ChannelClosed(ConnectionError):
    """The other end closed the connection (or the engine died)."""


def send(sock: socket.socket, body: bytes) -> None:
    """Send one framed message."""
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ChannelClosed("engine connection closed")
        got += k
    return bytes(buf)


def recv(sock: socket.socket) -> bytes:
    """Receive one framed message; ChannelClosed at end of stream."""
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        if not head:
            raise ChannelClosed("engine connection closed")
        head += _recv_exact(sock, 4 - len(head))
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ChannelClosed(f"frame of {n} bytes refused")
    return _recv_exact(sock, n) if n else b""


def pack_texts(kind: bytes, model: str, texts: list[str], task: str = "passage", pooling: str | None = None) -> bytes:
    """An E or C request."""
    name = model.encode()
    pool = (pooling or "").encode()
    blobs = [t.encode("utf-8", "surrogatepass") for t in texts]
    lens = struct.pack(f"!{len(blobs)}I", *map(len, blobs))
    return _HEAD.pack(kind, TASK_CODES[task], len(name), len(pool), len(blobs)) + name + pool + lens + b"".join(blobs)


def unpack_texts(body: bytes) -> tuple[bytes, str, str, str | None, list[str]]:
    """(kind, model, task, pooling, texts) of an E or C request."""
    kind, task, name_len, pool_len, n = _HEAD.unpack_from(body)
    pos = _HEAD.size
    model = body[pos:pos + name_len].decode()
    pos += name_len
    pooling = body[pos:pos + pool_len].decode() or None
    pos += pool_len
    lens = struct.unpack_from(f"!{n}I", body, pos)
    pos += 4 * n
    texts = []
    for k in lens:
        texts.append(body[pos:pos + k].decode("utf-8", "surrogatepass"))
        pos += k
    return kind, model, TASKS_BY_CODE[task], pooling, texts


def pack_vectors(vectors) -> bytes:
    """A V reply: the vectors as one float32 matrix."""
    arr = np.ascontiguousarray(np.stack(vectors) if len(vectors) else np.zeros((0, 0)), dtype=np.float32)
    return b"V" + _SHAPE.pack(*arr.shape) + arr.tobytes()


def unpack_vectors(body: bytes) -> list[np.ndarray]:
    """The rows of a V reply (read-only views of one buffer)."""
    rows, cols = _SHAPE.unpack_from(body, 1)
    arr = np.frombuffer(body, dtype=np.float32, offset=1 + _SHAPE.size, count=rows * cols).reshape(rows, cols)
    return list(arr)


def pack_rank(ranker: str, query: str, documents: list[str]) -> bytes:
    """An R request: the query travels as the first text, the documents after it."""
    return pack_texts(b"R", ranker, [query, *documents])


def pack_scores(scores) -> bytes:
    """An S reply: float32 when that holds every score exactly (a local model's own precision),
    float64 otherwise (a hosted API's scores), so the worker renders what an in-process app would."""
    arr = np.ascontiguousarray(scores, dtype=np.float64)
    small = arr.astype(np.float32)
    if np.array_equal(small.astype(np.float64), arr):
        return b"Sf" + small.tobytes()
    return b"Sd" + arr.tobytes()


def unpack_scores(body: bytes) -> np.ndarray:
    """The float64 scores of an S reply, in document order."""
    dtype = np.float32 if body[1:2] == b"f" else np.float64
    return np.frombuffer(body, dtype=dtype, offset=2).astype(np.float64)


def pack_counts(counts: list[int]) -> bytes:
    """An N reply."""
    return b"N" + struct.pack(f"!I{len(counts)}I", len(counts), *counts)


def unpack_counts(body: bytes) -> list[int]:
    """The token counts of an N reply."""
    (n,) = struct.unpack_from("!I", body, 1)
    return list(struct.unpack_from(f"!{n}I", body, 5))


def pack_json(kind: bytes, data) -> bytes:
    """An F (facts) message."""
    return kind + json.dumps(data, separators=(",", ":"), default=str).encode()


def pack_error(err: BaseException) -> bytes:
    """An X reply: a VecshimError's class, message, status and headers (never a traceback)."""
    if isinstance(err, VecshimError):
        data = {"type": type(err).__name__, "message": err.message, "status": err.status,
                "headers": dict(err.headers)}
    else:
        data = {"type": "BackendError", "message": f"engine failed ({type(err).__name__}); see the server log",
                "status": 502, "headers": {}}
    return pack_json(b"X", data)


def unpack_error(body: bytes) -> VecshimError:
    """The error an X reply describes, as the same VecshimError class when it is one of vecshim's."""
    data = json.loads(body[1:])
    cls = getattr(_errors, data.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, VecshimError)):
        cls = VecshimError
    err = cls.__new__(cls)
    VecshimError.__init__(err, data["message"], status=data["status"], headers=data.get("headers") or None)
    if isinstance(err, _errors.UpstreamError):  # the engine already retried: nothing left to retry here
        err.upstream_status, err.retry_after, err.retryable = None, None, False
    return err
