"""The ``cors`` builtin filter: lets browser pages on allowed origins call the proxy.

Config (every field optional except ``origins``; the filter is off unless listed)::

    - name: cors            # before auth: a browser's preflight carries no key
      config:
        origins: [http://localhost:3000, "https://*.example.com"]
        methods: [GET, POST, OPTIONS]             # default
        headers: [authorization, content-type, x-api-key, anthropic-version, ...]  # default list below
        allow_credentials: false
        max_age: 600                              # seconds a browser may cache a preflight
        expose_headers: [...]                     # default: EXPOSE below

Chain order is config order (``filters:``), so ``cors`` must come before
``auth``: a preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) is answered here with 204 and never
reaches ``auth``. On every other request from an allowed origin,
``Access-Control-Allow-Origin`` (the origin itself, never ``*`` with
credentials), ``Vary: Origin`` and the expose list are added through
:meth:`llmproxy.Exchange.set_response_header`, so upstream responses,
streams, local replies and errors all carry them. A disallowed origin gets
no CORS header at all (the browser then blocks the page from reading the
reply); its preflight is still answered 204 without them. ``origins: ["*"]``
with ``allow_credentials: true`` is refused at startup.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from llmproxy import Action, Exchange, FactoryContext, Filter, FilterFactory

__all__ = ["CorsFactory", "CorsFilter"]

#: Request headers a browser page may send by default (both SDKs' own headers included).
ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "x-api-key",
    "api-key",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "openai-organization",
    "openai-project",
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
    "cache-control",
    "x-request-id",
)

#: Response headers a page may read by default.
EXPOSE = (
    "x-request-id",
    "x-llmproxy-cache",
    "x-llmproxy-attempts",
    "x-llmproxy-provider",
    "x-llmproxy-model",
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)

_KNOWN = frozenset({"origins", "methods", "headers", "allow_credentials", "max_age", "expose_headers"})


def _strings(config: Mapping[str, Any], field: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = config.get(field)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field}: must be a list of non-empty strings")
    return tuple(value)


def _origin_pattern(origin: str) -> re.Pattern[str]:
    """``https://*.example.com`` -> one DNS label or more in place of ``*``; no other wildcard."""
    if "*" not in origin:
        return re.compile(re.escape(origin))
    return re.compile(re.escape(origin).replace(r"\*", r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"))


class CorsFilter(Filter):
    """Answers preflights; marks the responses to allowed origins."""

    factory: CorsFactory

    def on_request_headers(self, exchange: Exchange) -> Action:
        factory = self.factory
        headers = exchange.request.headers
        origin = headers.get("origin")
        if origin is None:
            return Action.CONTINUE
        allowed = factory.allows(origin)
        if exchange.request.method == "OPTIONS" and headers.get("access-control-request-method") is not None:
            fields: list[tuple[str, str]] = [
                ("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
            ]
            if allowed:
                fields += [("access-control-allow-origin", factory.echo(origin)), *factory.preflight_fields]
            exchange.send_local_reply(204, b"", fields)
            return Action.CONTINUE
        exchange.set_response_header("vary", "Origin")
        if allowed:
            exchange.set_response_header("access-control-allow-origin", factory.echo(origin))
            for name, value in factory.response_fields:
                exchange.set_response_header(name, value)
        return Action.CONTINUE


class CorsFactory(FilterFactory):
    """Validates the CORS policy once; matches origins."""

    filter_class = CorsFilter
    fail_open = False

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        unknown = set(config) - _KNOWN
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(_KNOWN))})")
        origins = _strings(config, "origins", ())
        if not origins:
            raise ValueError("origins: list the allowed origins (exact, or patterns like https://*.example.com)")
        credentials = config.get("allow_credentials", False)
        if not isinstance(credentials, bool):
            raise ValueError("allow_credentials: must be true or false")
        if credentials and "*" in origins:
            raise ValueError('origins: "*" cannot be combined with allow_credentials: true (browsers refuse it)')
        max_age = config.get("max_age", 600)
        if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0:
            raise ValueError("max_age: must be a whole number of seconds >= 0")
        methods = _strings(config, "methods", ("GET", "POST", "OPTIONS"))
        allow_headers = _strings(config, "headers", ALLOW_HEADERS)
        expose = _strings(config, "expose_headers", EXPOSE)
        self.any_origin = "*" in origins
        self.exact = frozenset(o for o in origins if "*" not in o)
        self.patterns = tuple(_origin_pattern(o) for o in origins if "*" in o and o != "*")
        self.credentials = credentials
        self.preflight_fields: list[tuple[str, str]] = [
            ("access-control-allow-methods", ", ".join(methods)),
            ("access-control-allow-headers", ", ".join(allow_headers)),
            ("access-control-max-age", str(max_age)),
        ]
        self.response_fields: list[tuple[str, str]] = [("access-control-expose-headers", ", ".join(expose))]
        if credentials:
            self.preflight_fields.append(("access-control-allow-credentials", "true"))
            self.response_fields.append(("access-control-allow-credentials", "true"))

    def allows(self, origin: str) -> bool:
        """Whether ``origin`` (the request's ``Origin``, exactly) may read responses."""
        if self.any_origin or origin in self.exact:
            return True
        return any(p.fullmatch(origin) for p in self.patterns)

    def echo(self, origin: str) -> str:
        """The ``Access-Control-Allow-Origin`` value: ``*`` only for a credential-less wildcard policy."""
        return "*" if self.any_origin and not self.credentials else origin
