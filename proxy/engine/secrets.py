"""Credential hygiene: client keys never leave the proxy, provider keys never reach a client.

Two directions, one module:

* a client's credentials are for the proxy: the core drops its
  ``Authorization``/``x-api-key``/``api-key`` headers before anything goes
  upstream (:mod:`llmproxy.engine.cycle`), and :func:`strip_query_credentials` drops
  the query parameters that SDKs and browsers use for keys (``?key=`` as in
  Google's APIs, ``?api_key=``, ``?api-key=``, ``?access_token=``...), so no
  client key reaches a provider, a log line or a trace in any form;
* a provider's error text must not quote the proxy's own credential back to
  a client (OpenAI quotes a masked key in its 401 message, other providers
  the whole key): :func:`redact` removes the target's key values and masked
  key shapes (``sk-live-*****T123``) from provider error bodies, and the core
  replaces provider authentication failures with its own message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from llmproxy.upstream import UpstreamTarget

__all__ = ["REDACTED", "credential_values", "redact", "redact_fields", "strip_query_credentials", "target_secrets"]

REDACTED = b"[redacted]"

#: Query parameters that carry credentials (compared after percent-decoding, case-insensitively).
_CREDENTIAL_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "token", "x-api-key"})

#: Header names (lowercase) whose values are credentials in an :class:`UpstreamTarget`.
_CREDENTIAL_FIELD = re.compile(rb"authorization|.*(?:key|token|secret|auth).*")

#: A masked key as providers quote it: a visible prefix, at least three ``*``, maybe a visible suffix.
_MASKED_KEY = re.compile(rb"[A-Za-z0-9_\-]{2,}\*{3,}[A-Za-z0-9_\-]*")

#: Values shorter than this are not treated as secrets (they would redact ordinary words).
_MIN_SECRET = 8


def strip_query_credentials(target: str) -> str:
    """``target`` (path plus query) without its credential-carrying query parameters.

    Other parameters keep their order and exact bytes; a query left empty
    loses its ``?``. Called only for targets that have a query string.
    """
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept = []
    for part in query.split("&"):
        # some servers split on ";" too: a credential behind one is dropped as well
        pieces = [p for p in part.split(";") if p and not _is_credential(p)]
        if pieces:
            kept.append(";".join(pieces))
    return f"{path}?{'&'.join(kept)}" if kept else path


def _is_credential(parameter: str) -> bool:
    return unquote_plus(parameter.partition("=")[0]).strip().lower() in _CREDENTIAL_PARAMS


def credential_values(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[bytes, ...]:
    """The credential values among ``headers`` (``Bearer`` stripped), longest first."""
    secrets: list[bytes] = []
    for name, value in headers:
        if _CREDENTIAL_FIELD.fullmatch(name) is None:
            continue
        scheme, _, rest = value.partition(b" ")
        for candidate in (value, rest if scheme.lower() in (b"bearer", b"basic", b"token") else b""):
            candidate = candidate.strip()
            if len(candidate) >= _MIN_SECRET:
                secrets.append(candidate)
    return tuple(sorted(set(secrets), key=len, reverse=True))


def target_secrets(target: UpstreamTarget) -> list[bytes]:
    """The credential values a target sends (computed once, when the target is built)."""
    return list(target.secrets)


def redact_fields(fields: list[tuple[bytes, bytes]], secrets: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """``fields`` with every value quoting one of ``secrets`` (or a masked key) redacted; the same list
    object when nothing needed it (the common case costs one scan)."""
    if not secrets:
        return fields
    for _, value in fields:
        if len(value) < _MIN_SECRET:
            continue
        if b"***" in value:
            break
        for secret in secrets:
            if secret in value:
                break
        else:
            continue
        break
    else:
        return fields  # no value quotes a secret (plain loops: no generator frame per field)
    return [(name, redact(value, list(secrets))) for name, value in fields]


def redact(body: bytes, secrets: list[bytes]) -> bytes:
    """``body`` with every value of ``secrets`` and every masked key shape replaced by ``[redacted]``."""
    for secret in secrets:
        if secret in body:
            body = body.replace(secret, REDACTED)
    if b"***" in body:
        body = _MASKED_KEY.sub(REDACTED, body)
    return body
