"""Operational routes: the OpenAPI document and its page."""
from __future__ import annotations

from functools import cache

from flask import Blueprint, Response

from ..openapi import get_spec
from .common import json_response
from .docs_page import render_docs_page

__all__ = ["bp"]

bp = Blueprint("ops", __name__)

#: The page's only script is inline; nothing may be loaded from elsewhere.
_DOCS_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


@cache
def _spec_json() -> dict:
    return get_spec()


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.0 description of every route."""
    return json_response(_spec_json())


@bp.get("/docs")
def docs():
    """The spec as a self-contained HTML page."""
    return Response(render_docs_page(_spec_json()), mimetype="text/html",
                    headers={"Content-Security-Policy": _DOCS_CSP})
