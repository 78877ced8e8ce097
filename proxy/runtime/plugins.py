"""Finding and loading filters through the ``llmproxy.filters`` entry-point group.

Builtin filters are registered in this project's own ``setup.cfg`` exactly
like third-party ones, so one loader serves both. The chain order is the
order of ``filters:`` in the config, never discovery order. A filter that is
missing, fails to import, is not a :class:`~llmproxy.filter.FilterFactory`, or
rejects its config stops startup with its name and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points

from llmproxy.context import FactoryContext
from llmproxy.engine.chain import Chain
from llmproxy.filter import FilterFactory
from llmproxy.runtime.config import ConfigError, FilterSpec

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "build_chain", "installed_filters", "load_factory_class"]

ENTRY_POINT_GROUP = "llmproxy.filters"


class PluginError(Exception):
    """A filter plugin cannot be used: names the plugin and the reason."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"filter '{name}': {reason}")


def installed_filters() -> dict[str, EntryPoint]:
    """Every entry point in the ``llmproxy.filters`` group, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_factory_class(name: str, available: dict[str, EntryPoint] | None = None) -> type[FilterFactory]:
    """Import the factory class registered as ``name``; raises :class:`PluginError`.

    A name of the form ``package.module:Class`` is imported directly instead
    of looked up among entry points: that is for filters under development
    (and tests), before they are packaged.
    """
    if ":" in name:
        ep = EntryPoint(name=name, value=name, group=ENTRY_POINT_GROUP)
    else:
        available = installed_filters() if available is None else available
        found = available.get(name)
        if found is None:
            known = ", ".join(sorted(available)) or "none"
            raise PluginError(name, f"not installed (installed filters: {known})")
        ep = found
    try:
        obj = ep.load()
    except Exception as exc:  # an import error in a plugin must not be a traceback
        raise PluginError(name, f"cannot be loaded from {ep.value}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, FilterFactory)):
        raise PluginError(name, f"{ep.value} is not a FilterFactory subclass")
    return obj


def build_chain(specs: Sequence[FilterSpec], context: FactoryContext, file: str) -> Chain:
    """Instantiate every configured filter's factory, in config order."""
    available = installed_filters()
    factories: list[FilterFactory] = []
    for spec in specs:
        try:
            cls = load_factory_class(spec.name, available)
        except PluginError as exc:
            raise ConfigError(file, f"{spec.path}.name", str(exc)) from None
        try:
            factory = cls(spec.name, spec.config, context)
            factories.append(factory)
            context.factories.append(factory)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(file, f"{spec.path}.config", f"filter '{spec.name}': {exc}") from None
    return Chain(factories)
