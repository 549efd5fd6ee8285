"""vecshim.bulk: chunks that respect the model's queue limits, line alignment, writers."""
from __future__ import annotations

import io

import numpy as np

from fakebackend import FakePlugin, fake_vector
from vecshim.app import create_app
from vecshim.bulk import NpyWriter, chunk_limits, embed_records, read_records


def loaded_model(**batch):
    app = create_app({"models": {"f": {"backend": "fake", "options": {"dim": 8}, "batch": batch}},
                      "cache": {"enabled": False}}, plugins=[FakePlugin()], load=False)
    state = app.extensions["vecshim"]
    model = state.get_model("f")
    model.load()
    return state, model


def test_chunks_stay_inside_the_request_token_limit():
    # (the model's load check embeds a ~1,200-token text, so the limit cannot go lower)
    state, model = loaded_model(max_request_tokens=2000, max_queue_tokens=4000)
    try:
        assert chunk_limits(model) == (1024, 1500)  # min(2000, 4000 / 2) x 3/4 characters
        texts = [f"text number {i} " + "word " * (i % 11) for i in range(300)]
        assert sum(len(t.split()) for t in texts) > 2000  # one chunk of all of them would be refused
        records = list(read_records([t + "\n" for t in texts], "text", "text", "id"))
        out = list(embed_records(model, records))
        assert [r.text for r, _ in out] == texts
        assert all(r.error is None for r, _ in out)
        for (r, v) in out:
            assert np.array_equal(v, fake_vector(r.text, "passage", 8))
        # Whole chunks reached the batcher (no 413 and text-by-text retry): calls carry many texts.
        sizes = [len(texts) for texts, _ in model.backend.calls[1:]]  # [0] is the warm-up
        assert max(sizes) > 1 and len(sizes) < len(texts) / 2, sizes
    finally:
        state.close()


def test_chunk_limits_follow_the_queue_size():
    state, model = loaded_model(max_queue=100)
    try:
        texts, chars = chunk_limits(model)
        assert texts == 25  # two chunks in flight, windows leave half the queue free
        assert chars == model.max_request_tokens * 3 // 4
    finally:
        state.close()


def test_npy_writer_to_a_seekable_file_and_to_a_pipe_agree(tmp_path):
    recs = list(read_records(["a\n", "\n", "b\n"], "text", "text", "id"))
    vecs = [np.arange(4, dtype=np.float32), None, np.ones(4, dtype=np.float32)]
    with open(tmp_path / "m.npy", "wb") as f:
        w = NpyWriter(f, 4, "text", "id")
        for r, v in zip(recs, vecs):
            w.write(r, v)
        w.close()

    class Pipe(io.BytesIO):
        def seekable(self):
            return False

    pipe = Pipe()
    w = NpyWriter(pipe, 4, "text", "id")
    for r, v in zip(recs, vecs):
        w.write(r, v)
    w.close()
    a, b = np.load(tmp_path / "m.npy"), np.load(io.BytesIO(pipe.getvalue()))
    assert a.dtype == np.dtype("<f4") and a.shape == (3, 4)
    assert np.array_equal(a, b, equal_nan=True)
    assert np.isnan(a[1]).all() and np.array_equal(a[0], vecs[0])
