"""Request parsing and reply shapes, one module per protocol."""
from __future__ import annotations

from typing import Any

import orjson

__all__ = ["dumps"]


def dumps(obj: Any) -> bytes:
    """Compact JSON; numpy float32 arrays are written with the shortest float32 repr.

    Every number then parses back (into Go's float32, or numpy's) to exactly
    the vector we computed, in ~20x less time and ~40% fewer bytes than
    `json.dumps(vector.tolist())`, which writes float64 digits.
    """
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
