"""The vecshim plugin contract (pluggy project name ``vecshim``)."""
from __future__ import annotations

import pluggy

NAME = "vecshim"
hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)


@hookspec
def register_backends(register):
    """Register embedding backends.

    :param register: callable; call ``register(BackendClass)`` once per
        `vecshim.Backend` subclass the plugin provides. Registering a name
        that another plugin already registered fails startup, naming both.
    :return: nothing.
    """


@hookspec
def register_rerankers(register):
    """Register rerankers (query-document relevance scorers).

    :param register: callable; call ``register(RerankerClass)`` once per
        `vecshim.Reranker` subclass the plugin provides. Registering a name
        that another plugin already registered fails startup, naming both.
    :return: nothing.
    """
