"""A request's texts as the batch embeds them, and back: token limits and the long-text policy.

`Model._run_here` runs these steps around its batcher: count the prefixed
texts against the request's token limit (refusing an over-size request
before counting all of it), cut each text longer than the backend reads into
windows as the model's `long_text` policy says (`chunk_mean`: every window,
`truncate`: the first, `error`: a 413), and merge a text's window vectors
back into one, weighted by their tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import PayloadTooLarge

__all__ = ["LOCAL_REQUEST_TOKENS", "HOSTED_REQUEST_TOKENS", "count_within_limit", "plan_units", "merge_units",
           "unit_length"]

#: Default per-request token limits (docs/operations.md "Connections" has the measurements).
LOCAL_REQUEST_TOKENS = 16_384
HOSTED_REQUEST_TOKENS = 1_048_576
#: A prefix of (limit + 1) x this many characters holds more than `limit` tokens in
#: most text (about 4-5 characters per token), so probing it refuses early.
_PROBE_CHARS_PER_TOKEN = 6

#: One request's units: the strings to embed, their token counts, and per text the
#: [start, end) range of its units.
Units = tuple[list[str], list[int], list[tuple[int, int]]]


def count_within_limit(backend, inputs: list[str], limit: int, model_name: str) -> list[int]:
    """Token counts, refusing (413) a request of more than `limit` tokens before tokenizing all of it.

    Counting a megabyte of text takes seconds. Texts are counted in groups
    of about the limit's worth of characters, stopping once the total is
    over; a long text is first probed by a prefix, whose count (if over
    what is left) proves the request too large at a cost bounded by the limit.
    """
    budget = (limit + 1) * _PROBE_CHARS_PER_TOKEN
    counts: list[int] = []
    total, i, n = 0, 0, len(inputs)
    while i < n:
        j, size = i + 1, len(inputs[i])
        while j < n and size + len(inputs[j]) <= budget:
            size += len(inputs[j])
            j += 1
        if size > budget:  # one long text: probe a prefix first
            room = limit - total
            if backend.count_tokens([inputs[i][:(room + 1) * _PROBE_CHARS_PER_TOKEN]])[0] > room:
                total = limit + 1
        if total <= limit:
            got = backend.count_tokens(inputs[i:j])
            counts.extend(got)
            total += sum(got)
        if total > limit:
            raise PayloadTooLarge(f"request has more than {limit} tokens; model {model_name!r} accepts at "
                                  f"most {limit} per request (batch.max_request_tokens)")
        i = j
    return counts


def plan_units(backend, texts: Sequence[str], inputs: Sequence[str], counts: Sequence[int], prefix: str,
               policy: str, model_name: str) -> Units:
    """Each text's units: its prefixed input if the backend reads it whole, else windows per `policy`.

    `inputs` are the texts with `prefix` added and `counts` their tokens.
    """
    limit = backend.max_input_tokens
    units: list[str] = []
    unit_tokens: list[int] = []
    spans: list[tuple[int, int]] = []
    for text, full, n in zip(texts, inputs, counts):
        start = len(units)
        if limit is None or n <= limit:
            units.append(full)
            unit_tokens.append(n)
        elif policy == "error":
            raise PayloadTooLarge(f"text has {n} tokens; model {model_name!r} reads at most {limit} "
                                  f"(long_text: error)")
        else:
            room = max(1, limit - (backend.count_tokens([prefix])[0] if prefix else 0))
            windows = backend.split_text(text, room)
            if policy == "truncate":
                windows = windows[:1]
            units.extend(prefix + w for w in windows)
            unit_tokens.extend(backend.count_tokens([prefix + w for w in windows]))
        spans.append((start, len(units)))
    return units, unit_tokens, spans


def merge_units(vecs: Sequence[np.ndarray], unit_tokens: Sequence[int], spans: Sequence[tuple[int, int]],
                normalized: bool, normalize: bool | None) -> list[np.ndarray]:
    """One float32 vector per text: its unit's, or its windows' token-weighted mean.

    A mean is brought back to unit length if the model's vectors are
    (`normalized`); every vector is if the model is configured `normalize: true`.
    """
    out = []
    for a, b in spans:
        if b - a == 1:
            v = vecs[a]
        else:
            weights = np.asarray(unit_tokens[a:b], dtype=np.float32)
            v = (np.stack(vecs[a:b]) * weights[:, None]).sum(0) / weights.sum()
            if normalized:
                v = unit_length(v)
        if normalize:
            v = unit_length(v)
        out.append(np.ascontiguousarray(v, dtype=np.float32))
    return out


def unit_length(v: np.ndarray) -> np.ndarray:
    """`v` scaled to length 1 (float32); a zero vector as it is."""
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > 0 else v
