"""vecshim: Weaviate's text2vec-transformers inference API for any embedding backend."""
from __future__ import annotations

__version__ = "0.1.0"

from .backend import Backend, BackendOptions, Task  # noqa: E402
from .errors import (  # noqa: E402
    BackendError, BackendUnavailable, BadRequest, ConfigError, UnknownBackendError, UpstreamError, VecshimError,
)
from .hookspecs import hookimpl  # noqa: E402
from .reranker import Reranker, RerankerOptions  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "Backend", "BackendOptions", "Task", "Reranker", "RerankerOptions", "VecshimError", "ConfigError",
    "BadRequest", "BackendError", "BackendUnavailable", "UpstreamError", "UnknownBackendError",
]
