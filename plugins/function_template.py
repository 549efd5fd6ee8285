"""Template: serve your own Python embedding function through vecshim.

Copy this file into a plugin folder, rename the backend, replace
`embed_texts` with your model, and point the config at it::

    plugins: {dirs: [plugins]}
    models:
      mine:
        backend: python-function
        options: {dimensions: 256}

As shipped, `embed_texts` is a real (if lexical) embedding: word and
character-trigram features hashed into `dimensions` buckets, L2-normalised.
It needs nothing but numpy, so it is a useful baseline and a fast stand-in
in tests. Check your version with `vecshim.testing` (see docs/plugins.md).
"""
from __future__ import annotations

import hashlib
import re
import threading
from typing import Any

import numpy as np
from pydantic import Field

from vecshim import Backend, BackendOptions, hookimpl

_WORD = re.compile(r"\w+", re.UNICODE)


class FunctionOptions(BackendOptions):
    """Options of the `python-function` backend: whatever your function needs."""

    dimensions: int = Field(256, ge=8, le=8192)
    lowercase: bool = True


def embed_texts(texts: list[str], task: str, options: FunctionOptions) -> list[list[float]]:
    """Your embedding function: one vector per text, all of the same length.

    Replace the body with a call to your model. `task` is "query" or
    "passage" (only ever "query" if the backend sets `task_aware = True`).
    """
    out = np.zeros((len(texts), options.dimensions), dtype=np.float32)
    for row, text in enumerate(texts):
        if options.lowercase:
            text = text.lower()
        words = _WORD.findall(text)
        grams = [w for w in words] + [f"#{w[i:i + 3]}" for w in words for i in range(max(1, len(w) - 2))]
        for gram in grams:
            digest = hashlib.blake2b(gram.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "little") % options.dimensions
            sign = 1.0 if digest[4] & 1 else -1.0  # signed hashing keeps collisions unbiased
            out[row, bucket] += sign
        norm = float(np.linalg.norm(out[row]))
        if norm > 0:
            out[row] /= norm
        else:
            out[row, 0] = 1.0  # text without words: a fixed unit vector, never zeros
    return out.tolist()


class FunctionBackend(Backend):
    """Wraps `embed_texts`; the core does batching, caching, checks and long text."""

    name = "python-function"
    Options = FunctionOptions
    normalized = True
    max_batch_size = 256
    max_input_tokens = 2048

    def __init__(self, options: FunctionOptions):
        super().__init__(options)
        # Delete the lock if your function is thread-safe; keep it if unsure.
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """Shown in /meta: never put secrets here."""
        return {"model": "hashed-word-trigram", "dimensions": self.options.dimensions}

    def fingerprint_parts(self) -> dict[str, Any]:
        """Change the version string whenever embed_texts changes its vectors."""
        return {"function": "embed_texts", "version": 1, **self.options.model_dump()}

    def embed(self, texts, task):
        """Call the function."""
        with self._lock:
            return embed_texts(texts, task, self.options)


@hookimpl
def register_backends(register):
    """Register the `python-function` backend."""
    register(FunctionBackend)
