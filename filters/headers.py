"""The ``headers`` builtin filter: set, add or remove request and response headers.

Config::

    - name: headers
      config:
        request:
          set: {x-team: research}     # replace any existing value
          add: {x-tag: llmproxy}      # append one more value
          remove: [x-debug]           # drop (case-insensitive)
        response:
          set: {x-served-by: llmproxy}
          remove: [server]

Request changes apply before the upstream sees the request; hop-by-hop and
credential headers are still removed by the core afterwards, so this
filter cannot leak a client key. Fails closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmproxy import Action, Exchange, FactoryContext, Filter, FilterFactory, Headers, check_field

__all__ = ["HeadersFilter", "HeadersFilterFactory"]


class _Edits:
    """One direction's edits, validated and encoded once: ``drop`` names, then ``append`` fields."""

    __slots__ = ("append", "drop")

    def __init__(self, section: Any, where: str) -> None:
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ValueError(f"{where}: must be a mapping with set/add/remove")
        unknown = set(section) - {"set", "add", "remove"}
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key (allowed: add, remove, set)")
        to_set = self._pairs(section.get("set"), f"{where}.set")
        to_add = self._pairs(section.get("add"), f"{where}.add")
        remove = section.get("remove") or []
        if not isinstance(remove, list) or not all(isinstance(n, str) for n in remove):
            raise ValueError(f"{where}.remove: must be a list of header names")
        # remove, then set (replace every value), then add == drop both, append both
        self.drop = frozenset(n.lower().encode("latin-1") for n in remove) | {name for name, _ in to_set}
        self.append = to_set + to_add

    @staticmethod
    def _pairs(value: Any, where: str) -> tuple[tuple[bytes, bytes], ...]:
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: must be a mapping of header name to value")
        out = []
        for name, val in value.items():
            if not isinstance(name, str):
                raise ValueError(f"{where}.{name}: header names are strings")
            try:
                field = (name.lower().encode("latin-1"), str(val).encode("latin-1"))
                check_field(*field)
            except (ValueError, UnicodeEncodeError):
                raise ValueError(f"{where}.{name}: invalid header") from None
            out.append(field)
        return tuple(out)

    def apply(self, headers: Headers) -> None:
        headers.edit_raw(self.drop, self.append)

    def __bool__(self) -> bool:
        return bool(self.drop or self.append)


class HeadersFilter(Filter):
    """Applies the factory's header edits to one exchange."""

    factory: HeadersFilterFactory

    def on_request_headers(self, exchange: Exchange) -> Action:
        self.factory.request_edits.apply(exchange.request.headers)
        return Action.CONTINUE

    def on_response_headers(self, exchange: Exchange) -> Action:
        if exchange.response is not None:
            self.factory.response_edits.apply(exchange.response.headers)
        return Action.CONTINUE


class HeadersFilterFactory(FilterFactory):
    """Builds the header edits once from config."""

    filter_class = HeadersFilter

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        unknown = set(config) - {"request", "response"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: request, response)")
        self.request_edits = _Edits(config.get("request"), "request")
        self.response_edits = _Edits(config.get("response"), "response")
