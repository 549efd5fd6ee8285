"""A lone text runs on the ONNX session with every core, and gets the batch session's vector."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REFERENCE_TEXTS, cos
from vecshim.backends.local import SentenceTransformersBackend as B
from vecshim.cpus import available_cpus

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")


class _Counting:
    """Delegates to an ONNX Runtime session and counts run() calls."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def _light(**options):
    B(B.Options(runtime="onnx", **options)).load()  # exports on a fresh machine; the next load is light
    backend = B(B.Options(runtime="onnx", **options))
    backend.concurrency = 2 * available_cpus()  # the throughput layout: fewer threads per session than cores
    backend.load()
    assert backend._light is not None
    backend.embed(["the first lone text builds the all-cores session"], "passage")
    return backend


@pytest.mark.skipif(available_cpus() < 2, reason="one core: no session with more threads to choose")
def test_a_lone_text_uses_the_all_cores_session_and_the_same_vector():
    backend = _light()
    light = backend._light
    light.solo, light.session = _Counting(light.solo), _Counting(light.session)
    together = np.asarray(backend.embed(list(REFERENCE_TEXTS), "passage"))
    assert (light.solo.runs, light.session.runs) == (0, 1)
    alone = [np.asarray(backend.embed([t], "passage"))[0] for t in REFERENCE_TEXTS]
    assert light.solo.runs == len(REFERENCE_TEXTS) and light.session.runs == 1
    assert min(cos(a, b) for a, b in zip(alone, together)) >= 0.99999


def test_solo_session_can_be_turned_off():
    assert _light(solo_session=False)._light.solo is None


@pytest.mark.skipif(available_cpus() < 2, reason="one core: no session with more threads to choose")
@pytest.mark.parametrize("spin", [False, True])
def test_solo_spin_sets_the_solo_sessions_spinning(spin):
    solo = _light(solo_spin=spin)._light.solo
    options = solo.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    if spin:  # spinning ends when a run returns, not later on cores a batch may need
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.skipif(available_cpus() < 2, reason="one core: no session with more threads to choose")
def test_the_solo_session_spins_by_default_and_the_batch_session_does_not_need_to():
    light = _light()._light
    assert light.solo.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert light.session.get_session_options().intra_op_num_threads == 1
