"""Prometheus `/metrics`, optionally behind its own bearer tokens."""
from __future__ import annotations

from flask import Blueprint, Response

from ..metrics import CONTENT_TYPE_LATEST
from .common import check_bearer, get_state

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    """Every worker's metrics (multiprocess mode) in the Prometheus text format."""
    state = get_state()
    check_bearer(state.config.server.auth.metrics_tokens)
    for name, model in state.models.items():
        if model.batcher is not None:
            state.stats.queue_depth.labels(name).set(model.batcher.depth)
    state.stats.refresh()
    return Response(state.stats.render(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
