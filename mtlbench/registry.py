"""Plugin registries for methods, task weightings, datasets and backbones.

Built-in entries register themselves with ``@register("name")`` when their module is
imported; every module of a built-in package (``mtlbench.methods``, ``mtlbench.weightings``,
``mtlbench.datasets``) is found with ``pkgutil`` and imported, so a new file needs no edit
anywhere else. Third-party packages add entries through the entry-point groups
``mtlbench.methods``, ``mtlbench.weightings``, ``mtlbench.datasets`` and
``mtlbench.backbones``; those are loaded lazily, the first time a registry is asked for a
name or a listing, and a plugin that fails to import is a warning, never a crash.

A registry may also hold roles: the method registered with ``reference=True`` is the one
every Δm is measured against (``METHODS.reference``).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata
import logging
import pkgutil
import warnings
from typing import Any, Callable

from mtlbench.errors import MtlbenchError

log = logging.getLogger(__name__)


class Registry:
    """A name -> object table with strict registration and helpful look-up errors."""

    def __init__(self, kind: str, builtin_module: str, group: str, names_entries: bool = False) -> None:
        self.kind = kind
        self.names_entries = names_entries  # give registered classes a ``name`` attribute
        self._reference: str | None = None
        self.builtin_module = builtin_module
        self.group = group
        self._entries: dict[str, Any] = {}
        self._descriptions: dict[str, str] = {}
        self.plugin_errors: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str, description: str | None = None, reference: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@METHODS.register("tr")``. Registering a name twice is an error.
        ``reference=True`` makes the entry the registry's reference (one at most)."""

        def add(obj: Any) -> Any:
            if name in self._entries:
                raise MtlbenchError(f"{self.kind} {name!r} is already registered "
                                    f"(by {_origin(self._entries[name])})")
            if reference:
                if self._reference is not None:
                    raise MtlbenchError(f"{self.kind} {name!r} cannot be the reference: "
                                        f"{self._reference!r} already is")
                self._reference = name
            self._entries[name] = obj
            self._descriptions[name] = description or _first_line(obj.__doc__)
            if self.names_entries and isinstance(obj, type):
                obj.name = name
            return obj

        return add

    @property
    def reference(self) -> str | None:
        """The entry registered with ``reference=True`` (for methods: the Δm reference)."""
        self.load()
        return self._reference

    def get(self, name: str) -> Any:
        self.load()
        if name not in self._entries:
            raise MtlbenchError(self._unknown_message(name))
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        self.load()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def describe(self, name: str) -> str:
        self.load()
        return self._descriptions[name]

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._entries

    def load(self) -> None:
        """Import the built-in entries, then every installed plugin of this group, once."""
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.builtin_module)
        for info in pkgutil.iter_modules(getattr(package, "__path__", []), prefix=f"{package.__name__}."):
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # one broken file must not take the others down
                self.plugin_errors[info.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"mtlbench: could not import built-in {self.kind} module {info.name}: {exc}",
                              RuntimeWarning, stacklevel=2)
        for ep in importlib.metadata.entry_points(group=self.group):
            self._load_plugin(ep)

    def _load_plugin(self, ep: importlib.metadata.EntryPoint) -> None:
        try:
            obj = ep.load()
            # An entry point may name a module that registers itself, or the object itself.
            if ep.name not in self._entries and callable(obj):
                self.register(ep.name)(obj)
        except Exception as exc:  # a broken plugin must not take the others down
            self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"mtlbench: could not load {self.kind} plugin {ep.name!r} "
                          f"({ep.value}): {exc}", RuntimeWarning, stacklevel=2)

    def _unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} Registered: {', '.join(known)}"


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].strip()


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS = Registry("method", "mtlbench.methods", "mtlbench.methods", names_entries=True)
WEIGHTINGS = Registry("weighting", "mtlbench.weightings", "mtlbench.weightings", names_entries=True)
DATASETS = Registry("dataset", "mtlbench.datasets", "mtlbench.datasets")
BACKBONES = Registry("backbone", "mtlbench.backbones", "mtlbench.backbones")

register_method = METHODS.register
register_weighting = WEIGHTINGS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register
REGISTRIES = {"methods": METHODS, "weightings": WEIGHTINGS, "datasets": DATASETS, "backbones": BACKBONES}
