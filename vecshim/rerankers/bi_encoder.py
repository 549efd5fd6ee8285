"""The `bi-encoder` reranker: cosine of query and document vectors from a configured embedding model.

It needs no weights of its own: the query is embedded as a `query` and each
document as a `passage` through `Model.embed`, so the model's batcher, cache,
prefixes, long-text policy and retries apply. It is the reranker vecshim
serves when the config has no `rerankers:` section.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..reranker import Reranker, RerankerOptions

__all__ = ["BiEncoderReranker", "BiEncoderOptions"]


class BiEncoderOptions(RerankerOptions):
    """Options of the `bi-encoder` reranker."""

    #: The configured embedding model (a name under `models:`).
    model: str
    query_task: Literal["query", "passage"] = "query"
    document_task: Literal["query", "passage"] = "passage"


class BiEncoderReranker(Reranker):
    """Scores are cosine similarities, in [-1, 1]."""

    name = "bi-encoder"
    Options = BiEncoderOptions
    delegates = True
    score_range = (-1.0, 1.0)

    def __init__(self, options: BiEncoderOptions):
        super().__init__(options)
        self._model: Any = None

    def use_models(self, models: Mapping[str, Any]) -> None:
        """Find the embedding model named by `options.model`."""
        name = self.options.model
        if name not in models:
            raise ConfigError(f"options.model: {name!r} is not a configured embedding model "
                              f"(models: {', '.join(models) or 'none'})")
        self._model = models[name]

    def info(self) -> dict[str, Any]:
        """The embedding model, the tasks and the similarity."""
        return {"embedding_model": self.options.model, "similarity": "cosine",
                "query_task": self.options.query_task, "document_task": self.options.document_task}

    def fingerprint_parts(self) -> dict[str, Any]:
        """The embedding model's vector space and the tasks."""
        parts = self._model.fingerprint_parts() if self._model is not None else self.options.model
        return {"embedding": parts, "query_task": self.options.query_task,
                "document_task": self.options.document_task}

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        """Cosine of the query vector with each document vector."""
        # An empty document (an object without the property) embeds as the single space
        # Weaviate's vectorizers send for empty objects; tokenizers see the same nothing.
        docs = [d if d.strip() else " " for d in documents]
        query = query if query.strip() else " "
        opts = self.options
        if opts.query_task == opts.document_task or getattr(self._model, "task_split", True) is False:
            # The model embeds both tasks alike: one call, one trip through its batcher.
            vectors = np.asarray(self._model.embed([query, *docs], opts.document_task), dtype=np.float64)
            q, d = vectors[0], vectors[1:]
        else:
            q = np.asarray(self._model.embed([query], opts.query_task)[0], dtype=np.float64)
            d = np.asarray(self._model.embed(docs, opts.document_task), dtype=np.float64)
        norms = np.linalg.norm(d, axis=1) * np.linalg.norm(q)
        return np.divide(d @ q, norms, out=np.zeros(len(docs)), where=norms > 0)


@hookimpl
def register_rerankers(register):
    """Register the `bi-encoder` reranker."""
    register(BiEncoderReranker)
