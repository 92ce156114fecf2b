"""Solver config strings: ``"name"``, ``"name:Key=value,Other=value"``.

Examples: ``"gurobi:Threads=1,FeasibilityTol=1e-9"``, ``"scs:eps_abs=1e-9,max_iters=20000"``,
``"cvxpy:OSQP"`` (a bare token is a positional argument of the backend).

Values are parsed to ``bool`` (true/false, any case), ``int``, ``float`` where they look
like one, and left as strings otherwise.  Setting names are passed through unchanged (each
backend validates them against its solver's own parameter names, and their values when it
is constructed).  A bare token is a positional argument; a backend that takes none
(every first-party one but ``cvxpy``) refuses it with :func:`bare_token_error`, which reads
it as a setting whose ``=value`` is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class SolverConfig:
    """A parsed config string."""

    name: str
    args: tuple[Any, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)


def check_choice(option: str, value: Any, choices: tuple) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{option} must be one of {choices}, got {value!r}")


def bare_token_error(backend: str, tokens, *, accepted: int = 0) -> ConfigError:
    """The :class:`ConfigError` for positional tokens a backend does not take: in a config
    string a bare token is a setting written without its ``=value`` (``"clarabel:max_iter"``).
    ``accepted`` is how many positional arguments the backend does take (``cvxpy`` takes
    the solver's name); the tokens from there on are named."""
    extra = [str(t) for t in tuple(tokens)[accepted:]]
    names = ", ".join(repr(t) for t in extra)
    takes = (
        "takes no positional argument"
        if accepted == 0
        else f"takes {accepted} positional argument{'s' if accepted > 1 else ''}"
    )
    example = ",".join([str(t) for t in tuple(tokens)[:accepted]] + [f"{extra[0]}=..."])
    return ConfigError(
        f"{backend}: setting(s) {names} without a value: settings are written NAME=VALUE "
        f"(e.g. {backend}:{example}); {backend} {takes}"
    )


def parse_value(text: str) -> Any:
    """``"1e-9"`` -> 1e-9, ``"20000"`` -> 20000, ``"True"`` -> True, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip()


def parse_config(spec: str) -> SolverConfig:
    """Parse ``"name[:k=v,k=v,...]"`` into a :class:`SolverConfig`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a solver config must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise ConfigError(f"solver config {spec!r} has no backend name before ':'")
    args: list[Any] = []
    settings: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in rest.split(","))):
        key, eq, value = token.partition("=")
        if not eq:
            if settings:
                raise ConfigError(f"in {spec!r}: positional value {token!r} after settings")
            args.append(parse_value(token))
            continue
        key = key.strip()
        if not key:
            raise ConfigError(f"in {spec!r}: setting {token!r} has no name")
        if key in settings:
            raise ConfigError(f"in {spec!r}: setting {key!r} given twice")
        settings[key] = parse_value(value)
    return SolverConfig(name, tuple(args), settings)
