"""The ``auth`` filter: virtual keys resolved to a :class:`~llmproxy.Principal`.

Place it first in the chain. Per exchange:

* ``on_request_headers``: find the client's key (``Authorization: Bearer``,
  ``x-api-key`` or ``api-key``: :mod:`~llmproxy.filters.auth.credential`),
  hash it once (SHA-256) and look the digest up in the key table (a dict).
  No key, a malformed credential or an unknown key is a 401 in the client's
  protocol (:mod:`~llmproxy.filters.auth.errors`). A known key's principal is
  published on ``exchange.vars["auth.principal"]``
  (:data:`llmproxy.filters.names.PRINCIPAL`) for the filters after it
  (ratelimit, budgets, tracing), routing's ``GET /v1/models`` (which lists
  only the models the principal may use) and the access log (``principal=``).
* ``on_request_body``: a principal with a ``models`` allow-list may only ask
  for a matching model (``fnmatch`` patterns of the client-facing name, read
  from the request JSON parsed once for every filter); otherwise 403
  ``model_not_allowed``. Token-counting endpoints are checked the same way.

The client's credential never goes upstream: the core drops
``Authorization``, ``x-api-key`` and ``api-key`` before any upstream request
(routing adds the provider's own key). Admin pages (``/metrics``,
``/admin/*``) and ``/healthz`` are answered by the connection before any
filter runs (``server.admin_allow`` guards the admin pages); an unknown path
is a 404 before the request hooks run.

Keys come from ``keys:`` in the section and from ``keys_file:`` (the same
list under a top-level ``keys:``, relative to the config file). The keys file
is checked every ``reload_interval`` seconds, off the event loop: when its
modification time (or size, or inode) changed it is read again, and a valid
new file replaces the table from that tick on (a removed key is refused from
then on); an invalid one keeps the old table and is logged once.

Config::

    - name: auth
      config:
        keys:
          - name: alice                    # unique principal name
            key_hash: "sha256:<64 hex>"    # `llmproxy keys hash` (or key: sk-..., warned about)
            team: research                 # optional
            models: ["demo", "gpt-4o*"]    # optional allow-list (fnmatch); absent = any model
            limits: {...}                  # optional, for the ratelimit filter (Principal.limits)
            budgets: [{...}, ...]          # optional, one or several (Principal.budgets)
            metadata: {owner: x}           # optional str -> str
        keys_file: keys.yaml               # optional
        reload_interval: 1                 # seconds between keys_file checks

Metrics: ``llmproxy_auth_failures_total{reason}`` with reason ``missing``,
``malformed``, ``unknown`` or ``model_not_allowed``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from hashlib import sha256
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from llmproxy import (
    ANONYMOUS,
    Action,
    ConfigError,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    Principal,
    Section,
)
from llmproxy.filters.auth.credential import MALFORMED, MISSING, presented_key
from llmproxy.filters.auth.errors import ModelNotAllowed, invalid_api_key
from llmproxy.filters.auth.keys import KeyTable, build_table, load_keys_file
from llmproxy.filters.names import PRINCIPAL

__all__ = ["AuthFactory", "AuthFilter"]

log = logging.getLogger("llmproxy.auth")

REASONS = (MISSING, MALFORMED, "unknown", "model_not_allowed")

#: What identifies one version of the keys file: (mtime_ns, size, inode).
_Signature = tuple[int, int, int]


class AuthFilter(Filter):
    """Per-exchange: the caller's principal, once its key was accepted."""

    factory: AuthFactory

    __slots__ = ("_principal",)

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self._principal: Principal = ANONYMOUS

    def on_request_headers(self, exchange: Exchange) -> Action:
        factory = self.factory
        found = presented_key(exchange.request.headers.raw())
        if isinstance(found, str):
            raise factory.refuse(found, exchange)
        principal = factory.by_digest.get(sha256(found).digest())
        if principal is None:
            raise factory.refuse("unknown", exchange)
        self._principal = principal
        exchange.vars[PRINCIPAL] = principal
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s: auth accepted %s (key %s)", exchange.id, principal.name, principal.key_id)
        return Action.CONTINUE

    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action:
        principal = self._principal
        if not principal.models or not body:
            return Action.CONTINUE  # any model; or nothing asked for (GET /v1/models)
        payload = exchange.request_json()  # parsed once, for every filter (no byte test: " {" is JSON too)
        model = payload.get("model") if isinstance(payload, dict) else None
        if isinstance(model, str) and not principal.allows_model(model):
            self.factory.failures["model_not_allowed"].inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s: auth refused: %s may not use model %r", exchange.id, principal.name, model[:200])
            shown = model if len(model) <= 200 else model[:200] + "..."
            raise ModelNotAllowed(f"this key may not use the model '{shown}'", param="model")
        return Action.CONTINUE  # a missing model is routing's 400


class AuthFactory(FilterFactory):
    """The key table (inline keys plus the keys file), its reload tick and the failure counter."""

    filter_class = AuthFilter
    fail_open = False
    authenticates = True

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        sec = Section(config, "", "")
        try:
            inline = build_table(sec.get("keys", list, None), "keys", "")
            keys_file = sec.get("keys_file", str, None)
            self.reload_interval: float = sec.get(
                "reload_interval", float, 1.0, lambda v: None if v > 0 else "must be greater than 0"
            )
            sec.finish()
            if keys_file is None and "keys" not in config:
                raise sec.error("keys", "is required (or keys_file): a list of key entries")
        except ConfigError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
        self._inline = inline
        self.keys_file: Path | None = context.config_dir / keys_file if keys_file else None
        self._signature: _Signature | None = None
        self._last_error = ""
        table = inline
        if self.keys_file is not None:
            try:
                self._signature = _signature(self.keys_file)
                table = inline.merged(load_keys_file(self.keys_file), str(self.keys_file))
            except OSError as exc:
                raise ValueError(f"keys_file: {self.keys_file}: cannot read: {exc.strerror or exc}") from None
            except ConfigError as exc:
                raise ValueError(f"keys_file: {exc}") from None
        self._table = table
        #: Digest of a key -> principal: what a request looks up.
        self.by_digest: Mapping[bytes, Principal] = table.by_digest
        counter = Counter(
            "llmproxy_auth_failures",
            "Requests refused by the auth filter, by reason (missing, malformed, unknown, model_not_allowed)",
            ["reason"],
            registry=context.metrics,
        )
        self.failures = {reason: counter.labels(reason) for reason in REASONS}

    @property
    def principals(self) -> list[Principal]:
        """Every configured principal (for tests and admin pages)."""
        return list(self.by_digest.values())

    def refuse(self, reason: str, exchange: Exchange) -> Exception:
        """Count a refusal and return the 401 to raise (no Bearer challenge for Anthropic clients)."""
        self.failures[reason].inc()
        if log.isEnabledFor(logging.DEBUG):  # the reason only: never the key
            log.debug("request %s: auth refused (%s key)", exchange.id, reason)
        return invalid_api_key(reason, exchange.client_protocol == "openai")

    async def start(self) -> None:
        if self.context.worker_id == 0:
            self._warn_plaintext(self._table.plaintext)
        if self.keys_file is not None:
            self.context.every(self.reload_interval, self._tick, f"auth-reload-{self.name}")

    def _warn_plaintext(self, names: tuple[str, ...]) -> None:
        if names:
            log.warning(
                "auth: %d key(s) given in plaintext (entries %s): plaintext keys belong in key_hash "
                "(`llmproxy keys hash`)",
                len(names),
                ", ".join(repr(n) for n in names),
            )

    async def _tick(self) -> None:
        await self.reload()

    async def reload(self) -> bool:
        """Read the keys file again if it changed (off the loop); True when a new table took over.

        A file that cannot be read or is invalid keeps the current table;
        the problem is logged once (until it changes).
        """
        path = self.keys_file
        if path is None:
            return False
        try:
            result = await asyncio.to_thread(_load_if_changed, path, self._signature)
            if result is None:
                return False
            self._signature, loaded = result  # a broken version is not read again: only a new one
            if isinstance(loaded, ConfigError):
                raise loaded
            table = self._inline.merged(loaded, str(path)).keeping(self.by_digest)
        except (OSError, ConfigError) as exc:
            message = f"{path}: cannot read: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
            if message != self._last_error:
                self._last_error = message
                log.error("auth: keys file not reloaded, keeping %d keys: %s", len(self.by_digest), message)
            return False
        new_plain = tuple(n for n in table.plaintext if n not in self._table.plaintext)
        self._table = table
        self.by_digest = table.by_digest
        self._last_error = ""
        log.info("auth: keys file %s reloaded: %d keys", path, len(table.by_digest))
        if self.context.worker_id == 0:
            self._warn_plaintext(new_plain)
        return True


def _signature(path: Path) -> _Signature:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _load_if_changed(path: Path, known: _Signature | None) -> tuple[_Signature, KeyTable | ConfigError] | None:
    """Blocking: the file's signature and its table (or why it is invalid), or None when the
    signature is still ``known``. Raises ``OSError`` when the file cannot be read."""
    signature = _signature(path)
    if signature == known:
        return None
    try:
        return signature, load_keys_file(path)
    except ConfigError as exc:
        return signature, exc
