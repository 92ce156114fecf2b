"""Backend registry: plugins found through the ``ffo`` entry-point group, loaded with pluggy.

Entry points are loaded *one by one*: a plugin that fails to import, or whose hook raises,
is recorded against its entry-point name (``ffo backends`` shows why) and the others load
normally.  Solver packages themselves are imported lazily by the adapters, never here.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from .config import SolverConfig, parse_config
from .errors import BackendUnavailable, ConfigError, FFOError
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, FFOSpec
from .protocol import Backend, Capabilities


@dataclass
class BackendInfo:
    """One row of :func:`available_backends`."""

    name: str
    available: bool
    reason: str
    capabilities: Capabilities | None
    version: str | None
    plugin: str  # entry-point name (or "<runtime>") that registered it


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self._factories: dict[str, tuple[Any, str]] = {}  # name -> (factory, plugin)
        self._runtime: dict[str, Any] = {}
        self._broken: dict[str, str] = {}  # plugin -> error text

    # -- loading -------------------------------------------------------------------------
    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(FFOSpec)
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if pm.get_plugin(ep.name) is not None or ep.name in self._broken:
                    continue  # the same distribution seen twice on sys.path
                try:
                    pm.register(ep.load(), name=ep.name)
                except Exception as exc:  # a broken plugin must not break the others
                    self._broken[ep.name] = f"import failed: {type(exc).__name__}: {exc}"
            for impl in pm.hook.ffo_register_backends.get_hookimpls():
                plugin = impl.plugin_name

                def register(factory: Any, _plugin: str = plugin) -> None:
                    self._add(factory, _plugin)

                try:
                    impl.function(register=register)
                except Exception as exc:
                    self._broken[plugin] = f"hook failed: {type(exc).__name__}: {exc}"
            self._loaded = True

    def _add(self, factory: Any, plugin: str) -> None:
        name = getattr(factory, "name", None)
        if not isinstance(name, str) or not name:
            raise FFOError(f"plugin {plugin!r} registered a backend without a name")
        name = name.lower()
        if name in self._factories and self._factories[name][1] != plugin:
            self._broken[plugin] = (
                f"backend name {name!r} already registered by {self._factories[name][1]!r}"
            )
            return
        self._factories[name] = (factory, plugin)

    def factories(self) -> dict[str, tuple[Any, str]]:
        self._load()
        merged = dict(self._factories)
        merged.update({k: (v, "<runtime>") for k, v in self._runtime.items()})
        return merged

    def register(self, factory: Any) -> None:
        name = getattr(factory, "name", "")
        if not name:
            raise FFOError("a backend class needs a non-empty 'name' attribute")
        self._runtime[name.lower()] = factory

    def unregister(self, name: str) -> None:
        self._runtime.pop(name.lower(), None)

    def broken(self) -> dict[str, str]:
        self._load()
        return dict(self._broken)


_REGISTRY = _Registry()


def register_backend(factory: Any) -> None:
    """Register a backend class at run time (tests, notebooks) without an entry point."""
    _REGISTRY.register(factory)


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend`."""
    _REGISTRY.unregister(name)


def _availability(factory: Any) -> tuple[bool, str]:
    check = getattr(factory, "availability", None)
    if check is None:
        return True, ""
    try:
        ok, reason = check()
    except Exception as exc:
        return False, f"availability check failed: {type(exc).__name__}: {exc}"
    return bool(ok), reason


def available_backends() -> dict[str, BackendInfo]:
    """Every registered backend: can it run here, why not, its capabilities and version.

    Plugins that failed to load appear with ``available=False`` and the error as reason.
    """
    out: dict[str, BackendInfo] = {}
    for name, (factory, plugin) in sorted(_REGISTRY.factories().items()):
        ok, reason = _availability(factory)
        version = None
        if hasattr(factory, "version"):
            try:
                version = factory.version()
            except Exception:
                version = None
        out[name] = BackendInfo(
            name, ok, reason, getattr(factory, "capabilities", None), version, plugin
        )
    for plugin, error in _REGISTRY.broken().items():
        if plugin not in out:
            out[plugin] = BackendInfo(plugin, False, error, None, None, plugin)
    return out


def get_backend(spec: str | Backend | SolverConfig) -> Backend:
    """A configured backend instance from a config string (``"scs:eps_abs=1e-9"``).

    A backend instance is returned unchanged.  Raises :class:`BackendUnavailable` for an
    unknown name (listing the known ones) or a backend that cannot run here (saying why),
    and :class:`ConfigError` for bad settings.
    """
    if isinstance(spec, Backend) and not isinstance(spec, (str, SolverConfig)):
        return spec
    config = spec if isinstance(spec, SolverConfig) else parse_config(spec)
    factories = _REGISTRY.factories()
    if config.name not in factories:
        broken = _REGISTRY.broken()
        hint = (
            f" (plugin {config.name!r} failed to load: {broken[config.name]})"
            if config.name in broken
            else ""
        )
        names = ", ".join(sorted(factories)) or "none"
        raise BackendUnavailable(
            f"unknown solver {config.name!r}{hint}; available backends: {names}"
        )
    factory, _ = factories[config.name]
    ok, reason = _availability(factory)
    if not ok:
        raise BackendUnavailable(f"backend {config.name!r} cannot run here: {reason}")
    try:
        return factory(*config.args, **config.settings)
    except FFOError:
        raise
    except TypeError as exc:
        raise ConfigError(f"backend {config.name!r} rejected its settings: {exc}") from exc
