"""The plugin hook of the ``ffo`` entry-point group (pluggy).

A plugin distribution declares, in its ``pyproject.toml``::

    [project.entry-points.ffo]
    mysolver = "my_package.ffo_plugin"

and that module implements the hook::

    from ffo_core.hookspecs import hookimpl

    @hookimpl
    def ffo_register_backends(register):
        register(MySolverBackend)

``register`` takes a *backend class* (a factory): class attributes ``name`` and
``capabilities``, optionally ``availability()`` and ``version()`` class methods (see
:class:`ffo_core.backend_base.BackendBase`), and a constructor taking the settings of the
config string as keyword arguments.
"""

from __future__ import annotations

import pluggy

PROJECT = "ffo"
#: The entry-point group plugins register under.
ENTRY_POINT_GROUP = "ffo"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class FFOSpec:
    """Hook specifications."""

    @hookspec
    def ffo_register_backends(self, register):
        """Register backend classes by calling ``register(BackendClass)`` once per backend."""
