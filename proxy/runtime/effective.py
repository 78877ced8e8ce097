"""``llmproxy check --print``: the effective config as YAML, secrets masked.

Effective means what the proxy runs with: defaults filled in for the core
sections, ``${VAR}`` references resolved. Masked: the values of fields whose
name says they hold a credential (``key``, ``keys``, ``api_key``, ``token``,
``secret``, ``password``, ``authorization`` and the like, header values of
credential headers), the password of a ``redis://`` URL, and ``${VAR}`` values
inside those. A masked value prints as ``"***"`` (an empty one as ``""``, so
a missing key still shows).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from llmproxy.runtime.config import Config

__all__ = ["MASK", "effective_dict", "effective_yaml", "mask_secrets"]

MASK = "***"

#: Field names whose values are credentials (matched on the lower-cased name).
_SECRET_NAME = re.compile(r"(^|[_-])(keys?|api[_-]?key|token|secret|password|passwd|authorization|credentials?)$")
#: Names that look like the above but hold no secret (ids, hashes, file paths).
_NOT_SECRET = frozenset({"key_id", "key_hash", "keys_file", "max_tokens", "tokens", "key_header"})


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered not in _NOT_SECRET and _SECRET_NAME.search(lowered) is not None


def _mask_value(value: Any) -> Any:
    """The value of a credential field: strings masked; a list's entries likewise, except that a
    mapping entry (``keys: [{name: alice, key: sk-...}]``) is masked field by field; a mapping
    value (``keys: {sk-...: {status: 401}}``) has its names (the credentials) masked."""
    if isinstance(value, str):
        return MASK if value else ""
    if isinstance(value, list):
        return [mask_secrets(v) if isinstance(v, Mapping) else _mask_value(v) for v in value]
    if isinstance(value, Mapping):
        return {f"{MASK}{i}": mask_secrets(v) for i, v in enumerate(value.values(), 1)}
    return MASK if value is not None else None


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:{MASK}@{host}", parts.path, parts.query, parts.fragment))


def mask_secrets(value: Any) -> Any:
    """A copy of ``value`` (mappings, lists, scalars) with credential fields masked."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            if _is_secret_name(name):
                out[name] = _mask_value(item)
            elif name.lower() == "headers" and isinstance(item, Mapping):
                out[name] = {h: _mask_value(v) if _is_secret_header(str(h)) else v for h, v in item.items()}
            else:
                out[name] = mask_secrets(item)
        return out
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value:
        return _mask_url(value)
    return value


def _is_secret_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in ("authorization", "proxy-authorization", "x-api-key", "api-key", "cookie") or _is_secret_name(
        lowered
    )


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: _plain(v) for k, v in value}  # header pairs
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def effective_dict(config: Config) -> dict[str, Any]:
    """``config`` as plain data in the file's layout, secrets masked."""
    server = _plain(config.server)
    upstream = None
    if config.upstream is not None:
        up = config.upstream
        upstream = {
            "url": up.url,
            "headers": dict(up.headers),
            "timeouts": _plain(up.timeouts),
            "tls": {"verify": up.verify, "ca_file": up.ca_file},
        }
    data: dict[str, Any] = {
        "server": server,
        "limits": _plain(config.limits),
        "upstream": upstream,
        "pool": _plain(config.pool),
        "store": config.store,
        "mock_upstreams": [
            {"name": m.name, "host": m.host, "port": m.port, **_plain(dict(m.options))} for m in config.mock_upstreams
        ],
        "filters": [{"name": f.name, "config": _plain(dict(f.config))} for f in config.filters],
    }
    if upstream is None:
        del data["upstream"]
    masked: dict[str, Any] = mask_secrets(data)
    return masked


def effective_yaml(config: Config) -> str:
    """:func:`effective_dict` as YAML text (keys in the file's order)."""
    text: str = yaml.safe_dump(effective_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"# effective config of {config.file} (defaults filled in, secrets masked)\n" + text
