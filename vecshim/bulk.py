"""`vecshim embed`: bulk embedding through the server's Model and batcher.

One output record per input line, in input order. A line with nothing to
embed (blank, or a JSON line without the text field) gets an error record
(`"vector": null`, or a row of NaN in `.npy`), so output line N always
belongs to input line N. Chunks are length-sorted before they reach the
batcher, so each backend call pads little, and two chunks are in flight so
the encoder never waits for the writer.
"""
from __future__ import annotations

import concurrent.futures
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np
import orjson

from .errors import VecshimError

__all__ = ["Record", "read_records", "embed_records", "JsonlWriter", "NpyWriter", "ParquetWriter", "WRITERS"]

#: Texts per chunk handed to Model.embed; two chunks are in flight at once.
CHUNK = 1024


@dataclass
class Record:
    """One input line: its text (None when there is nothing to embed) and the id to keep."""

    line: int
    text: str | None
    id: Any = None
    error: str | None = None


def read_records(lines: Iterable[str], input_format: str, text_field: str, id_field: str) -> Iterator[Record]:
    """Input lines -> records, one per line (blank lines included)."""
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if input_format == "text":
            yield Record(n, line or None, error=None if line else "blank line")
            continue
        if not line.strip():
            yield Record(n, None, error="blank line")
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            yield Record(n, None, error=f"invalid JSON: {err}")
            continue
        if not isinstance(obj, dict):
            yield Record(n, None, error="not a JSON object")
            continue
        text, rid = obj.get(text_field), obj.get(id_field)
        if not isinstance(text, str) or not text:
            yield Record(n, None, rid, error=f"no non-empty string field {text_field!r}")
            continue
        yield Record(n, text, rid)


def _embed_chunk(model, chunk: list[Record], task: str, dimensions: int | None) -> list[np.ndarray | None]:
    """Vectors for a chunk (None where a record has none); one bad text fails only its own record."""
    todo = [i for i, r in enumerate(chunk) if r.text is not None]
    todo.sort(key=lambda i: len(chunk[i].text))  # similar lengths share a backend call
    out: list[np.ndarray | None] = [None] * len(chunk)
    try:
        vectors = model.embed([chunk[i].text for i in todo], task, dimensions) if todo else []
    except VecshimError:
        vectors = None
    if vectors is not None:
        for i, v in zip(todo, vectors):
            out[i] = v
        return out
    for i in todo:  # slow path, only after an error: find the texts that fail
        try:
            out[i] = model.embed([chunk[i].text], task, dimensions)[0]
        except VecshimError as err:
            chunk[i].error = err.message
    return out


def _start(fn, *args) -> concurrent.futures.Future:
    # A daemon thread, not an executor: Ctrl-C must not wait for a chunk to finish.
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            fut.set_result(fn(*args))
        except BaseException as err:  # handed to the caller through the future
            fut.set_exception(err)

    threading.Thread(target=run, name="vecshim-embed-chunk", daemon=True).start()
    return fut


def chunk_limits(model, in_flight: int = 2, chunk_size: int = CHUNK) -> tuple[int, int | None]:
    """(texts, characters) per chunk, so `in_flight` chunks stay inside the model's queue limits.

    A token covers at least one character, so a character budget bounds the
    tokens a chunk brings (`batch.max_request_tokens`, `max_queue_tokens`)
    without tokenizing twice; a quarter is kept for prefixes and windows.
    """
    batch = model.cfg.batch
    texts = max(1, min(chunk_size, batch.max_queue // (2 * in_flight)))
    per_request = getattr(model, "max_request_tokens", None)
    queue = batch.max_queue_tokens or (4 * per_request if per_request else None)
    limits = [x for x in (per_request, queue // in_flight if queue else None) if x]
    return texts, (min(limits) * 3 // 4 if limits else None)


def embed_records(model, records: Iterable[Record], task: str = "passage", dimensions: int | None = None,
                  chunk_size: int = CHUNK, in_flight: int = 2) -> Iterator[tuple[Record, np.ndarray | None]]:
    """(record, vector or None) for each record, in input order."""
    max_texts, max_chars = chunk_limits(model, in_flight, chunk_size)
    pending: list[tuple[list[Record], concurrent.futures.Future]] = []
    chunk: list[Record] = []
    chars = 0

    def drain(keep: int):
        while len(pending) > keep:
            recs, fut = pending.pop(0)
            yield from zip(recs, fut.result())

    for rec in records:
        size = len(rec.text or "")
        if chunk and (len(chunk) >= max_texts or (max_chars and chars + size > max_chars)):
            pending.append((chunk, _start(_embed_chunk, model, chunk, task, dimensions)))
            chunk, chars = [], 0
            yield from drain(in_flight - 1)
        chunk.append(rec)
        chars += size
    if chunk:
        pending.append((chunk, _start(_embed_chunk, model, chunk, task, dimensions)))
    yield from drain(0)


class JsonlWriter:
    """Compact JSON lines; float32 numbers in their shortest exact form."""

    binary = True

    def __init__(self, out: IO[bytes], dimension: int, input_format: str, id_field: str):
        self.out = out
        self.jsonl = input_format == "jsonl"
        self.id_field = id_field

    def write(self, rec: Record, vec: np.ndarray | None) -> None:
        row: dict[str, Any] = {self.id_field: rec.id} if self.jsonl else {"text": rec.text or ""}
        row["vector"] = vec
        if vec is None:
            row["error"] = rec.error or "no vector"
        self.out.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))

    def close(self) -> None:
        self.out.flush()


class NpyWriter:
    """A float32 `.npy` matrix, row N = input line N; lines without a vector are rows of NaN.

    Streams to a seekable file (the header is rewritten with the row count at
    the end); to a pipe, rows are kept in memory and written at the end.
    """

    binary = True
    HEADER = 128  # bytes: magic, version, length, then the padded header dict

    def __init__(self, out: IO[bytes], dimension: int, input_format: str, id_field: str):
        self.out = out
        self.dim = dimension
        self.rows = 0
        try:
            self.seekable = out.seekable() and out.tell() == 0
        except OSError:
            self.seekable = False
        self.kept: list[np.ndarray] = []
        if self.seekable:
            out.write(self._header(0))
        self.nan = np.full(dimension, np.nan, dtype=np.float32)

    def _header(self, rows: int) -> bytes:
        text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {self.dim}), }}"
        body = text.ljust(self.HEADER - 10 - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")

    def write(self, rec: Record, vec: np.ndarray | None) -> None:
        row = self.nan if vec is None or vec.shape[0] != self.dim else vec
        row = np.ascontiguousarray(row, dtype="<f4")
        if self.seekable:
            self.out.write(row.tobytes())
        else:
            self.kept.append(row)
        self.rows += 1

    def close(self) -> None:
        if self.seekable:
            self.out.seek(0)
            self.out.write(self._header(self.rows))
        else:
            matrix = np.stack(self.kept) if self.kept else np.zeros((0, self.dim), dtype="<f4")
            np.save(self.out, matrix)
        self.out.flush()


class ParquetWriter:
    """Parquet (pyarrow, the `parquet` extra): columns line, text or the id (as text), vector, error."""

    binary = True
    ROWS_PER_GROUP = 4096

    def __init__(self, out: IO[bytes], dimension: int, input_format: str, id_field: str):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise VecshimError("--format parquet needs: pip install 'vecshim[parquet]'") from None
        self.pa = pa
        self.jsonl = input_format == "jsonl"
        self.dim = dimension
        self.schema = pa.schema([("line", pa.int64()), (id_field if self.jsonl else "text", pa.string()),
                                 ("vector", pa.list_(pa.float32(), dimension)), ("error", pa.string())])
        self.writer = pq.ParquetWriter(out, self.schema)
        self.out = out
        self.rows: list[tuple] = []

    def write(self, rec: Record, vec: np.ndarray | None) -> None:
        if self.jsonl:  # ids of any JSON type, kept as text: strings as they are, others as JSON
            key = rec.id if isinstance(rec.id, str) or rec.id is None else orjson.dumps(rec.id).decode()
        else:
            key = rec.text or ""
        self.rows.append((rec.line, key, vec, None if vec is not None else (rec.error or "no vector")))
        if len(self.rows) >= self.ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        pa = self.pa
        lines, keys, vecs, errors = zip(*self.rows)
        flat = np.concatenate([v if v is not None else np.zeros(self.dim, np.float32) for v in vecs])
        vector = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self.dim,
                                                   mask=pa.array([v is None for v in vecs]))
        columns = [pa.array(lines, pa.int64()), pa.array(keys, pa.string()), vector, pa.array(errors, pa.string())]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.out.flush()


WRITERS = {"jsonl": JsonlWriter, "npy": NpyWriter, "parquet": ParquetWriter}


def count_lines(path: str) -> int | None:
    """Lines in a regular file (for the progress bar's ETA); None for pipes."""
    if path == "-" or not os.path.isfile(path):
        return None
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def stdin_lines() -> Iterator[str]:
    """stdin as text lines (UTF-8, invalid bytes replaced)."""
    stream = open(sys.stdin.fileno(), "r", encoding="utf-8", errors="replace", newline="\n", closefd=False)
    yield from stream
