"""``solver_args``: solver settings given as a dict, per layer or per call (cvxpylayers'
idiom: ``CvxpyLayer(..., solver_args={"eps": 1e-8})`` and ``layer(*params,
solver_args={"max_iters": 5000})``).

A key is either one of the backend's own setting names (what its config string takes:
``"scs:eps_abs=1e-9"``) or one of the common cvxpylayers/diffcp keys that the backend
translates: each adapter declares the translation as data, a class attribute
``solver_arg_names`` mapping a common key to its own setting name (or a tuple of names set
to the same value).  A key a backend has neither as a setting nor as a translation is
refused by name with a :class:`~ffo_core.errors.ConfigError` -- never silently ignored.

The settings are applied through the backend's ``with_settings(**settings)``, which returns
a configured copy; the layer's own backend is not changed, and nothing is recompiled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

#: The cvxpylayers/diffcp keys users write most, for messages.
COMMON_KEYS = ("eps", "eps_abs", "eps_rel", "max_iters", "verbose", "acceleration_lookback")


def native_settings(backend: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` in ``backend``'s own setting names (translating common keys)."""
    if not isinstance(args, Mapping):
        raise ConfigError(f"solver_args must be a dict, got {type(args).__name__}")
    name = getattr(backend, "name", type(backend).__name__)
    names = getattr(backend, "setting_names", None)
    own = set(names()) if callable(names) else set()
    table = dict(getattr(backend, "solver_arg_names", {}) or {})
    out: dict[str, Any] = {}
    for key, value in args.items():
        if key in own:
            out[key] = value
        elif key in table:
            targets = table[key]
            for target in targets if isinstance(targets, tuple) else (targets,):
                out[target] = value
        else:
            known = sorted(own | set(table))
            raise ConfigError(
                f"solver_args: {key!r} is not a setting of backend {name!r} and has no "
                f"equivalent there; it takes: {', '.join(known) or 'no settings'}"
            )
    return out


def with_solver_args(backend: Any, args: Mapping[str, Any] | None) -> Any:
    """``backend`` configured with ``args`` (a copy; ``backend`` itself if ``args`` is
    empty or None)."""
    if not args:
        return backend
    settings = native_settings(backend, args)
    copy = getattr(backend, "with_settings", None)
    name = getattr(backend, "name", type(backend).__name__)
    if not callable(copy):
        raise ConfigError(
            f"solver_args: backend {name!r} takes no settings after construction (it has no "
            "with_settings method); pass them in its config string instead"
        )
    try:
        return copy(**settings)
    except TypeError as exc:
        raise ConfigError(f"solver_args for backend {name!r}: {exc}") from exc


__all__ = ["COMMON_KEYS", "native_settings", "with_solver_args"]
