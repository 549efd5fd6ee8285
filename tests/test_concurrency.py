"""Concurrency correctness: 64 clients at once, and each gets the vector of its own input.

Every request goes over real HTTP while 63 others are in flight, so the
micro-batcher mixes texts, tasks, models and `dimensions` from different
clients into shared backend calls. Each reply is compared with the vector
computed for that input alone: exactly for FakeBackend (a hash of task and
text), by cosine >= 0.9999 for the bundled model (a batched forward pass pads
texts, which moves the last float32 digits). The cache is off, so nothing is
answered from a previous request.
"""
from __future__ import annotations

import json
import random
import re
import threading
import time

import numpy as np
import pytest

from conftest import fake_config
from fakebackend import fake_vector
from goclient import GoClient, go_json

CLIENTS = 64
PER_CLIENT = 6
WORDS = ("ferris wheel London river Thames tower bridge museum garden harbour lighthouse bakery "
         "glacier violin orbit comet lantern meadow quartz saffron tundra walnut zephyr café Zürich "
         "東京 mañana naïve").split()


def make_texts(n: int, seed: int) -> list[str]:
    """`n` distinct texts of 1-40 words, some with markup and non-ASCII."""
    rng = random.Random(seed)
    texts = set()
    while len(texts) < n:
        words = rng.choices(WORDS, k=rng.randint(1, 40))
        text = " ".join(words)
        if rng.random() < 0.15:
            text = f"<b>{text}</b> & more"
        texts.add(text)
    return sorted(texts)


def post_json(client: GoClient, path: str, payload) -> tuple[int, object]:
    reply = client.request("POST", path, go_json(payload))
    return reply.status, json.loads(reply.body)


def hammer(plan: list[list[tuple]], send) -> list[tuple]:
    """Run one thread per client, all released together; each sends its plan on one keep-alive connection.

    `send(client, step)` returns what to check later; returns (step, result) pairs.
    """
    results, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(len(plan))

    def run(steps, client):
        try:
            start.wait(30)
            for step in steps:
                out = send(client, step)
                with lock:
                    results.append((step, out))
        except BaseException as err:  # reported below, with the step count
            errors.append(err)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(steps, c)) for steps, c in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors[:3]
    return results


def batch_sizes(served, model: str) -> tuple[float, float]:
    """(batches, texts) the model's batcher gathered, from the Prometheus text."""
    text = served.state.stats.render().decode()

    def value(name):
        m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0
    return value("vecshim_batch_size_count"), value("vecshim_batch_size_sum")


# -- FakeBackend: exact equality ----------------------------------------------------

def test_64_clients_get_exactly_their_own_vectors(serve):
    cfg = fake_config(dim=32, task_aware=True, matryoshka=True, delay_s=0.004,
                      batch={"max_size": 64, "max_wait_ms": 15})
    cfg["models"]["other"] = {"backend": "fake", "options": {"dim": 24, "task_aware": True},
                              "batch": {"max_size": 64, "max_wait_ms": 15}}
    s = serve(cfg)
    texts = make_texts(120, seed=1)
    rng = random.Random(7)
    routes = ("vectors", "model_vectors", "openai", "ollama")
    plan = []
    for c in range(CLIENTS):
        steps = []
        for _ in range(PER_CLIENT):
            route = rng.choice(routes)
            model = "fake" if route in ("vectors", "ollama") else rng.choice(["fake", "other"])
            task = "passage" if route == "ollama" else rng.choice(["query", "passage"])
            dims = rng.choice([None, 8, 16]) if model == "fake" else None
            picked = tuple(rng.sample(texts, rng.randint(1, 4) if route in ("openai", "ollama") else 1))
            steps.append((route, model, task, dims, picked))
        plan.append((steps, s.client()))

    def send(client, step):
        route, model, task, dims, picked = step
        if route == "vectors":
            r = client.vectors(picked[0], task_type=task, dimensions=dims)
            return r.status, [r.json().get("vector")]
        if route == "model_vectors":
            r = client.vectors(picked[0], base=f"/models/{model}", task_type=task, dimensions=dims)
            return r.status, [r.json().get("vector")]
        if route == "openai":
            body = {"input": list(picked), "model": model, "input_type": task, "dimensions": dims}
            status, data = post_json(client, "/v1/embeddings", body)
            return status, [d["embedding"] for d in data.get("data", [])]
        status, data = post_json(client, "/api/embed", {"model": model, "input": list(picked), "dimensions": dims})
        return status, data.get("embeddings", [])

    results = hammer(plan, send)
    assert len(results) == CLIENTS * PER_CLIENT
    dim_of = {"fake": 32, "other": 24}
    for (route, model, task, dims, picked), (status, vectors) in results:
        assert status == 200, (route, model, vectors)
        assert len(vectors) == len(picked)
        for text, got in zip(picked, vectors):
            want = fake_vector(text, task, dim_of[model])
            if dims:
                want = want[:dims] / np.linalg.norm(want[:dims])
            got = np.asarray(got, dtype=np.float32)
            assert got.shape == want.shape, (route, text, dims)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-7, err_msg=f"{route} {model} {task} {text!r}")
    batches, total = batch_sizes(s, "fake")
    assert batches and total / batches > 2, "the test must really mix clients in one backend call"
    calls = s.state.models["fake"].backend.calls
    assert max(len(t) for t, _ in calls) > 4 and {task for _, task in calls} == {"query", "passage"}


def test_a_failing_text_fails_only_its_own_request(serve):
    """One poisoned text in a shared batch: its client gets a JSON error, the batch mates their vectors."""
    s = serve(fake_config(dim=16, fail_on="POISON", delay_s=0.005, batch={"max_size": 64, "max_wait_ms": 20}))
    texts = make_texts(CLIENTS * 3, seed=3)
    plan = []
    for c in range(CLIENTS):
        steps = [texts[c * 3 + i] + (" POISON" if (c + i) % 9 == 0 else "") for i in range(3)]
        plan.append((steps, s.client()))

    def send(client, text):
        r = client.vectors(text)
        return r.status, r.json()

    results = hammer(plan, send)
    poisoned = 0
    for text, (status, body) in results:
        if "POISON" in text:
            poisoned += 1
            assert status == 502 and isinstance(body["error"], str) and "vector" not in body
        else:
            assert status == 200, body
            np.testing.assert_array_equal(np.asarray(body["vector"], dtype=np.float32),
                                          fake_vector(text, "passage", 16))
    assert poisoned >= CLIENTS * 3 // 9
    batches, total = batch_sizes(s, "fake")
    assert total / batches > 2


# -- the bundled model: cosine >= 0.9999 against the vector computed alone ---------

def unpadded(st_model, texts) -> dict[str, np.ndarray]:
    """Each text's vector from sentence-transformers without padding, as if computed alone: texts
    of one token length go in one forward pass (no pad tokens), one pass per length."""
    texts = sorted(texts)
    by_length: dict[int, list[str]] = {}
    for text, ids in zip(texts, st_model.tokenizer(texts)["input_ids"]):
        by_length.setdefault(len(ids), []).append(text)
    out = {}
    for group in by_length.values():
        vectors = st_model.encode(group, batch_size=len(group), convert_to_numpy=True, show_progress_bar=False)
        out.update(zip(group, vectors))
    return out


@pytest.fixture(scope="module")
def three_models():
    """The bundled MiniLM served three ways: plain, e5-style prefixes, Matryoshka-declared."""
    from conftest import Served
    from vecshim.app import create_app

    batch = {"max_size": 64, "max_wait_ms": 10}
    cfg = {"models": {
        "minilm": {"backend": "sentence-transformers", "batch": batch},
        "e5": {"backend": "sentence-transformers", "batch": batch,
               "prefixes": {"query": "query: ", "passage": "passage: "}},
        "mrl": {"backend": "sentence-transformers", "batch": batch, "matryoshka": True},
    }, "cache": {"enabled": False}}
    s = Served(create_app(cfg, load_entrypoints=False))
    assert s.state.wait_ready(180), s.state.not_ready_reason()
    yield s
    s.close()


@pytest.mark.slow
def test_64_clients_on_the_bundled_model_match_the_vector_computed_alone(three_models, st_model):
    s = three_models
    texts = make_texts(90, seed=11)
    rng = random.Random(5)
    plan = []
    for c in range(CLIENTS):
        steps = []
        for _ in range(PER_CLIENT):
            model = rng.choice(["minilm", "e5", "mrl"])
            task = rng.choice(["query", "passage"])
            dims = rng.choice([None, 64, 128, 256]) if model == "mrl" else None
            n = rng.choice([1, 1, 1, 3])  # some OpenAI-style multi-input requests
            steps.append((model, task, dims, tuple(rng.sample(texts, n))))
        plan.append((steps, s.client()))

    def send(client, step):
        model, task, dims, picked = step
        if len(picked) == 1:
            base = "" if model == "minilm" else f"/models/{model}"
            r = client.vectors(picked[0], base=base, task_type=task, dimensions=dims)
            return r.status, [r.json().get("vector")]
        body = {"input": list(picked), "model": model, "input_type": task, "dimensions": dims}
        status, data = post_json(client, "/v1/embeddings", body)
        return status, [d["embedding"] for d in data.get("data", [])]

    t0 = time.monotonic()
    results = hammer(plan, send)
    elapsed = time.monotonic() - t0
    prefix = {"minilm": {"query": "", "passage": ""}, "e5": {"query": "query: ", "passage": "passage: "},
              "mrl": {"query": "", "passage": ""}}
    alone = unpadded(st_model, {prefix[model][task] + text for (model, task, _, picked), _ in results
                                for text in picked})
    worst = 1.0
    for (model, task, dims, picked), (status, vectors) in results:
        assert status == 200, (model, task, dims, vectors)
        assert len(vectors) == len(picked)
        for text, got in zip(picked, vectors):
            want = alone[prefix[model][task] + text]
            if dims:
                want = want[:dims] / np.linalg.norm(want[:dims])
            got = np.asarray(got, dtype=np.float64)
            assert got.shape == want.shape, (model, dims)
            cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
            worst = min(worst, cos)
            assert cos >= 0.9999, (model, task, dims, text, cos)
    # A mix-up would be caught: no two distinct inputs of this corpus are that close.
    refs = np.stack(list(alone.values()))
    gram = refs @ refs.T / np.outer(np.linalg.norm(refs, axis=1), np.linalg.norm(refs, axis=1))
    np.fill_diagonal(gram, 0)
    assert gram.max() < 0.9999, gram.max()
    for model in ("minilm", "e5", "mrl"):
        batches, total = batch_sizes(s, model)
        assert batches and total / batches > 1.5, (model, batches, total)
    print(f"\n{len(results)} requests from {CLIENTS} clients in {elapsed:.1f} s; worst cosine {worst:.7f}")


@pytest.mark.slow
def test_prefixes_and_dimensions_really_change_the_vector(three_models):
    """Guards the test above: the three ways of serving the model give different vectors."""
    c = three_models.client()
    text = "a lighthouse on the harbour"
    plain = np.asarray(c.vectors(text, task_type="query").json()["vector"])
    e5q = np.asarray(c.vectors(text, base="/models/e5", task_type="query").json()["vector"])
    e5p = np.asarray(c.vectors(text, base="/models/e5", task_type="passage").json()["vector"])
    cut = np.asarray(c.vectors(text, base="/models/mrl", dimensions=64).json()["vector"])
    assert len(plain) == 384 and len(cut) == 64
    assert plain @ e5q < 0.999 and e5q @ e5p < 0.999
    assert abs(np.linalg.norm(cut) - 1) < 1e-5
    # Not declared Matryoshka: truncated and renormalised all the same, as the reference does.
    plain_cut = np.asarray(c.vectors(text, dimensions=64).json()["vector"])
    assert np.allclose(plain_cut, cut, atol=1e-6)
    c.close()
