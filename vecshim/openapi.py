"""The OpenAPI 3.0 description of every route, written by hand as a dict.

`tests/test_openapi.py` checks that each registered Flask route appears here
(and nothing else does), then fuzzes the running server from this spec.
"""
from __future__ import annotations

from typing import Any

from . import __version__

__all__ = ["get_spec"]

_TEXT = {"type": "string", "minLength": 1}
_VECTOR = {"type": "array", "items": {"type": "number"}, "minItems": 1}
_TEXTS = {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 2048}]}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "A configured model name (or, on `/models/{name}/rerank`, reranker name)."}
_OPTIONAL_AUTH = [{}, {"bearer": []}]

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string", "description": "Human-readable reason."}},
    },
    "OpenAIError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": ["invalid_request_error", "server_error"]},
                "param": {"type": "string", "nullable": True, "description": "The request field at fault."},
                "code": {"type": "string", "nullable": True},
            },
        }},
    },
    "VectorsRequest": {
        "type": "object", "required": ["text"],
        "description": "Weaviate sends the reply struct back with `dims: 0`, `vector: null`, "
                       "`error: \"\"`; those and unknown keys are ignored.",
        "properties": {
            "text": _TEXT,
            "config": {"type": "object", "nullable": True, "properties": {
                "pooling_strategy": {"type": "string", "nullable": True,
                                     "description": "`masked_mean` (Weaviate's default) or `cls`: honoured by "
                                                    "local models whose pooling is a separate step; other "
                                                    "models accept `masked_mean` only. Others: 400."},
                "task_type": {"type": "string", "enum": ["query", "passage", ""],
                              "description": "Default `passage`."},
                "dimensions": {"type": "integer", "minimum": 0,
                               "description": "0 or absent: the native size; smaller: truncated and "
                                              "re-normalised (400 under `dimensions: strict` unless "
                                              "Matryoshka)."},
            }},
            "dims": {"type": "integer"},
            "vector": {"type": "array", "items": {"type": "number"}, "nullable": True},
            "error": {"type": "string", "nullable": True},
        },
    },
    "VectorsReply": {
        "type": "object", "required": ["text", "vector", "dim", "dims"],
        "properties": {"text": {"type": "string"}, "vector": _VECTOR,
                       "dim": {"type": "integer"}, "dims": {"type": "integer"}},
    },
    "Meta": {"type": "object", "description": "Model facts, rendered at startup; opaque to Weaviate."},
    "EmbeddingsRequest": {
        "type": "object", "required": ["input"],
        "properties": {
            "input": {**_TEXTS, "description": "One text or up to 2048 (`server.max_texts_per_request`)."},
            "model": {"type": "string", "description": "A configured model name or alias; absent: the default."},
            "dimensions": {"type": "integer", "minimum": 1,
                           "description": "Up to the native size: smaller vectors are truncated and "
                                          "re-normalised (400 under `dimensions: strict` unless Matryoshka)."},
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
            "input_type": {"type": "string", "enum": ["query", "passage"], "default": "passage",
                           "description": "vecshim extension: the task for asymmetric models."},
            "user": {"type": "string", "description": "Accepted and ignored."},
        },
    },
    "EmbeddingsReply": {
        "type": "object", "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {
                "type": "object", "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"type": "string", "enum": ["embedding"]},
                    "index": {"type": "integer", "minimum": 0},
                    "embedding": {"oneOf": [_VECTOR, {"type": "string", "format": "byte",
                                                      "description": "little-endian float32, base64"}]},
                },
            }},
            "model": {"type": "string"},
            "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
                "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
        },
    },
    "Model": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                       "created": {"type": "integer"}, "owned_by": {"type": "string"},
                       "root": {"type": "string", "description": "The configured model an alias names."}},
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"type": "string", "enum": ["list"]},
                       "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
    },
    "OllamaEmbedRequest": {
        "type": "object", "required": ["input"],
        "properties": {
            "model": {"type": "string", "description": "A configured model name or alias (`name:latest` "
                                                       "also matches); absent: the default."},
            "input": _TEXTS,
            "dimensions": {"type": "integer", "minimum": 1},
            "truncate": {"type": "boolean", "description": "Ignored: the model's `long_text` policy applies."},
            "options": {"type": "object", "description": "Ignored."},
            "keep_alive": {"description": "Ignored."},
        },
    },
    "OllamaEmbedReply": {
        "type": "object", "required": ["model", "embeddings"],
        "properties": {"model": {"type": "string"},
                       "embeddings": {"type": "array", "items": _VECTOR},
                       "total_duration": {"type": "integer"}, "load_duration": {"type": "integer"},
                       "prompt_eval_count": {"type": "integer"}},
    },
    "FeatureExtractionRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {"inputs": _TEXTS, "options": {
            "type": "object", "description": "Accepted and ignored.",
            "properties": {"wait_for_model": {"type": "boolean"}, "use_gpu": {"type": "boolean"},
                           "use_cache": {"type": "boolean"}}}},
    },
    "FeatureExtractionReply": {"type": "array", "items": _VECTOR},
    "RerankRequest": {
        "type": "object", "required": ["query"],
        "description": "Weaviate's reranker-transformers body. Without `documents`, a non-empty `property` "
                       "is scored as the one document and the reply carries `score`.",
        "properties": {
            "query": {"type": "string"},
            "documents": {"type": "array", "items": {"type": "string"}, "maxItems": 2048,
                          "description": "Empty strings allowed (objects without the property)."},
            "property": {"type": "string", "nullable": True},
        },
    },
    "RerankReply": {
        "type": "object", "required": ["query", "scores"],
        "properties": {
            "query": {"type": "string"},
            "scores": {"type": "array", "nullable": True, "description": "One per document, in input order.",
                       "items": {"type": "object", "required": ["document", "score"],
                                 "properties": {"document": {"type": "string"}, "score": {"type": "number"}}}},
            "property": {"type": "string", "nullable": True},
            "score": {"type": "number", "nullable": True},
            "error": {"type": "string", "nullable": True},
        },
    },
    "CohereRerankRequest": {
        "type": "object", "required": ["query", "documents"],
        "properties": {
            "query": {"type": "string"},
            "documents": {"type": "array", "maxItems": 2048, "items": {"oneOf": [
                {"type": "string"},
                {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]}},
            "model": {"type": "string", "description": "A configured reranker name or alias; absent: the default."},
            "top_n": {"type": "integer", "minimum": 1, "description": "Absent: every document."},
            "return_documents": {"type": "boolean", "default": False},
            "max_tokens_per_doc": {"type": "integer", "description": "Ignored: the reranker's `long_text` "
                                                                    "policy applies."},
        },
    },
    "CohereRerankReply": {
        "type": "object", "required": ["id", "results", "meta"],
        "properties": {
            "id": {"type": "string"},
            "results": {"type": "array", "description": "Sorted by score; every document once unless `top_n`.",
                        "items": {"type": "object", "required": ["index", "relevance_score"], "properties": {
                            "index": {"type": "integer", "minimum": 0},
                            "relevance_score": {"type": "number"},
                            "document": {"type": "object", "properties": {"text": {"type": "string"}}}}}},
            "meta": {"type": "object"},
        },
    },
    "CohereError": {
        "type": "object", "required": ["message"],
        "properties": {"id": {"type": "string"}, "message": {"type": "string"}},
    },
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(statuses: str, schema: str = "Error") -> dict:
    text = {"400": "Invalid request body", "401": "Missing or wrong bearer token (when configured)",
            "404": "Unknown model or route", "413": "Too many texts, a text too long, or body too large",
            "502": "The backend failed", "503": "Model not ready, or queue full (Retry-After)",
            "504": "Timed out waiting for the vector"}
    return {code: _json(schema, text[code]) for code in statuses.split()}


_EMBED_ERRORS = "400 401 404 413 502 503 504"


def _embed(summary: str, description: str, tag: str, request: str, reply: str, *, errors: str = "Error",
           path_name: bool = False, ok: str = "The vectors, in input order") -> dict:
    op = {
        "tags": [tag], "summary": summary, "description": description, "security": _OPTIONAL_AUTH,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": _json(reply, ok), **_errors(_EMBED_ERRORS, errors)},
    }
    if path_name:
        op["parameters"] = [_NAME]
    return {"post": op}


def _health(kind: str, path_name: bool) -> dict:
    op: dict[str, Any] = {"tags": ["weaviate"], "responses": {"204": {"description": "Alive / ready"}}}
    if kind == "live":
        op["summary"] = "Liveness: 204 while the process answers"
    else:
        op["summary"] = "Readiness: 204 once loaded and warmed up, 503 before"
        op["responses"].update(_errors("503"))
    if path_name:
        op["parameters"] = [_NAME]
        op["responses"].update(_errors("404"))
    return {"get": op}


def _meta(path_name: bool) -> dict:
    op = {"tags": ["weaviate"], "summary": "Model facts (pre-rendered, never waits on inference)",
          "responses": {"200": _json("Meta", "Model facts")}}
    if path_name:
        op["parameters"] = [_NAME]
        op["responses"].update(_errors("404"))
    return {"get": op}


def _paths() -> dict:
    vectors = ("Embed one text (text2vec-transformers, text2vec-model2vec)",
               "Weaviate sends one text per request with no Content-Type; any Content-Type is parsed as JSON.")
    hf = ("Feature extraction for text2vec-huggingface `endpointURL`",
          "Replies with a bare `[[float, ...], ...]`. Every text is embedded as a passage.")
    rerank = ("Score documents against a query (reranker-transformers)",
              "One score per document, in input order (Weaviate's client assigns them by position). "
              "`{name}` is a configured reranker; `/rerank` uses the default one.")
    cohere = "`model` names a configured reranker. Results are sorted by score; errors are `{\"message\"}`."
    return {
        "/.well-known/live": _health("live", False),
        "/.well-known/ready": _health("ready", False),
        "/meta": _meta(False),
        "/vectors": _embed(*vectors, "weaviate", "VectorsRequest", "VectorsReply"),
        "/models/{name}/.well-known/live": _health("live", True),
        "/models/{name}/.well-known/ready": _health("ready", True),
        "/models/{name}/meta": _meta(True),
        "/models/{name}/vectors": _embed(*vectors, "weaviate", "VectorsRequest", "VectorsReply", path_name=True),
        "/v1/embeddings": _embed(
            "OpenAI-compatible embeddings (text2vec-openai, OpenAI SDKs)",
            "Replies carry large `x-ratelimit-*` headers so Weaviate batches. Errors are OpenAI-shaped.",
            "openai", "EmbeddingsRequest", "EmbeddingsReply", errors="OpenAIError"),
        "/v1/models": {"get": {
            "tags": ["openai"], "summary": "Configured models, then aliases", "security": _OPTIONAL_AUTH,
            "responses": {"200": _json("ModelList", "The models"), **_errors("401", "OpenAIError")}}},
        "/v1/models/{model}": {"get": {
            "tags": ["openai"], "summary": "One model or alias", "security": _OPTIONAL_AUTH,
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json("Model", "The model"), **_errors("401 404", "OpenAIError")}}},
        "/api/embed": _embed("Ollama embed API (text2vec-ollama)",
                             "Weaviate sends no Content-Type. Every text is embedded as a passage.",
                             "ollama", "OllamaEmbedRequest", "OllamaEmbedReply"),
        "/hf": _embed(*hf, "huggingface", "FeatureExtractionRequest", "FeatureExtractionReply"),
        "/models/{name}/hf": _embed(*hf, "huggingface", "FeatureExtractionRequest", "FeatureExtractionReply",
                                    path_name=True),
        "/rerank": _embed(*rerank, "rerank", "RerankRequest", "RerankReply", ok="The scores"),
        "/models/{name}/rerank": _embed(*rerank, "rerank", "RerankRequest", "RerankReply", path_name=True,
                                        ok="The scores"),
        "/v1/rerank": _embed("Cohere v1 rerank", cohere, "rerank", "CohereRerankRequest", "CohereRerankReply",
                             errors="CohereError", ok="The ranking"),
        "/v2/rerank": _embed("Cohere v2 rerank (reranker-cohere with baseURL, cohere SDK)", cohere, "rerank",
                             "CohereRerankRequest", "CohereRerankReply", errors="CohereError", ok="The ranking"),
        "/metrics": {"get": {
            "tags": ["ops"], "summary": "Prometheus metrics (text format)",
            "description": "Behind `server.auth.metrics_tokens` when that list is set.",
            "security": _OPTIONAL_AUTH,
            "responses": {"200": {"description": "Prometheus text exposition format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors("401")}}},
        "/openapi.json": {"get": {"tags": ["ops"], "summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3.0",
                                                        "content": {"application/json": {"schema": {
                                                            "type": "object"}}}}}}},
        "/docs": {"get": {"tags": ["ops"], "summary": "This document as a page (no external assets)",
                          "responses": {"200": {"description": "HTML",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    }


def get_spec() -> dict[str, Any]:
    """The OpenAPI document for every route vecshim serves."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "vecshim",
            "version": __version__,
            "description": "Embeddings for Weaviate's self-hosted text modules (transformers, model2vec, "
                           "openai, ollama, huggingface) from any configured backend, and reranking for "
                           "reranker-transformers and reranker-cohere. Every route shares the same models, "
                           "batcher, cache and limits. `GET /openapi.json` is this document as JSON.",
        },
        "tags": [
            {"name": "weaviate", "description": "text2vec-transformers and text2vec-model2vec, per model"},
            {"name": "openai", "description": "text2vec-openai with a custom baseURL, and OpenAI clients"},
            {"name": "ollama", "description": "text2vec-ollama"},
            {"name": "huggingface", "description": "text2vec-huggingface with a custom endpointURL"},
            {"name": "rerank", "description": "reranker-transformers and reranker-cohere with a custom baseURL"},
            {"name": "ops", "description": "Metrics and this document"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Only when `server.auth.embed_tokens` is set."}},
        },
    }
