"""Two Weaviate collections vectorised by two vecshim models (docker-compose demo).

    cd deploy && docker compose up --build -d
    python example_collections.py [--weaviate http://localhost:8080]

`Article` uses the module's default URL (TRANSFORMERS_INFERENCE_API, i.e.
vecshim's default model `minilm` at /vectors). `Headline` points its vectorizer
at another vecshim model with `inferenceUrl`: http://vecshim:8080/models/minilm-128
(the URL is resolved by Weaviate inside the compose network, not by this script).

Standard library only, over Weaviate's REST API. With the python client v4
(weaviate-client >= 4.16) the same two collections are:

    import weaviate
    from weaviate.classes.config import Configure, DataType, Property

    client = weaviate.connect_to_local()
    client.collections.create(
        "Article",
        properties=[Property(name="title", data_type=DataType.TEXT),
                    Property(name="body", data_type=DataType.TEXT)],
        vector_config=Configure.Vectors.text2vec_transformers(),   # default model
    )
    client.collections.create(
        "Headline",
        properties=[Property(name="title", data_type=DataType.TEXT)],
        vector_config=Configure.Vectors.text2vec_transformers(
            inference_url="http://vecshim:8080/models/minilm-128",
        ),
    )

Never point an existing collection at another model: its stored vectors
would mix two vector spaces. See docs/operations.md, "Upgrading models".
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

#: vecshim as Weaviate reaches it (the compose service name and port).
VECSHIM_URL = "http://vecshim:8080"
#: The second model of deploy/vecshim.yaml.
SECOND_MODEL = "minilm-128"


def collections() -> list[dict]:
    """The class definitions (Weaviate REST `POST /v1/schema` bodies)."""
    return [
        {
            "class": "Article",
            "properties": [{"name": "title", "dataType": ["text"]},
                           {"name": "body", "dataType": ["text"]}],
            "vectorConfig": {
                "default": {
                    "vectorizer": {"text2vec-transformers": {"vectorizeClassName": False}},
                    "vectorIndexType": "hnsw",
                },
            },
        },
        {
            "class": "Headline",
            "properties": [{"name": "title", "dataType": ["text"]}],
            "vectorConfig": {
                "default": {
                    "vectorizer": {"text2vec-transformers": {
                        "vectorizeClassName": False,
                        "inferenceUrl": f"{VECSHIM_URL}/models/{SECOND_MODEL}",
                    }},
                    "vectorIndexType": "hnsw",
                },
            },
        },
    ]


OBJECTS = {
    "Article": [{"title": "The London Eye", "body": "A cantilevered observation wheel on the South Bank."},
                {"title": "Sourdough", "body": "Bread leavened by wild yeast and lactic acid bacteria."}],
    "Headline": [{"title": "Ferris wheel reopens after repairs"},
                 {"title": "Bakeries report record bread sales"}],
}


def call(base: str, method: str, path: str, body: dict | None = None) -> dict:
    """One JSON request to Weaviate; raise with its error body on failure."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        raise SystemExit(f"{method} {path}: {err.code} {err.read().decode(errors='replace')}") from None
    return json.loads(raw) if raw else {}


def main(argv: list[str] | None = None) -> int:
    """Create both collections, add two objects each, run one nearText per collection."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weaviate", default="http://localhost:8080")
    p.add_argument("--recreate", action="store_true", help="delete the collections first")
    args = p.parse_args(argv)
    base = args.weaviate.rstrip("/")
    for cls in collections():
        if args.recreate:
            try:
                call(base, "DELETE", f"/v1/schema/{cls['class']}")
            except SystemExit:
                pass
        call(base, "POST", "/v1/schema", cls)
        for props in OBJECTS[cls["class"]]:
            call(base, "POST", "/v1/objects", {"class": cls["class"], "properties": props})
    for name, concept in (("Article", "big wheel in London"), ("Headline", "baking")):
        query = {"query": '{ Get { %s(nearText: {concepts: [%s]}, limit: 1) { title } } }'
                          % (name, json.dumps(concept))}
        print(name, json.dumps(call(base, "POST", "/v1/graphql", query)["data"]["Get"][name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
