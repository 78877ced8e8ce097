"""Virtual keys: hashing, and the key table built from the ``keys`` entries.

A virtual key is stored as ``sha256:<64 hex>`` (the SHA-256 of the key's
UTF-8 bytes); the key itself never needs to be in a config file.
``key_id`` (``vk-`` and the first 8 hex digits of the hash) names a key in
logs, metrics and store keys without revealing anything usable.

One entry is one principal with one key (no key rotation within an entry:
give the new key its own entry with another name, then remove the old one).

:func:`build_table` validates a list of entries (from the config section or
a ``keys_file``) and returns a :class:`KeyTable`: a dict from the raw
32-byte digest to the :class:`~llmproxy.Principal`, so a request costs one
SHA-256 and one dict lookup. The lookup compares digests, never keys: what
its timing could reveal is about the digest of a guess, which tells nothing
usable about a configured key, so no constant-time compare is needed. Errors are ``ConfigError`` naming the entry
and field (``keys[2].key_hash``) and the reason; never the key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llmproxy import ConfigError, Principal, Section, read_yaml
from llmproxy.filters.ratelimit.rules import principal_rules

__all__ = [
    "HASH_PREFIX",
    "KeyTable",
    "build_table",
    "hash_key",
    "key_id",
    "load_keys_file",
    "new_key",
]

HASH_PREFIX = "sha256:"

_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
#: Names and teams appear in log lines, metric labels and store keys: no spaces or quotes.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,127}")
_ENTRY_FIELDS = ("name", "key_hash", "key", "team", "models", "limits", "budgets", "metadata")


def hash_key(key: str | bytes) -> str:
    """``sha256:<hex>`` of ``key`` (a ``str`` is hashed as UTF-8)."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return HASH_PREFIX + hashlib.sha256(raw).hexdigest()


def key_id(key_hash: str) -> str:
    """The non-secret id of a key from its ``sha256:<hex>`` hash: ``vk-`` + 8 hex digits."""
    return "vk-" + key_hash[len(HASH_PREFIX) : len(HASH_PREFIX) + 8].lower()


def new_key() -> str:
    """A fresh random virtual key: ``sk-`` and 256 random bits, URL-safe base64."""
    return "sk-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyTable:
    """Digest of a key -> its principal, plus what loading found worth saying."""

    by_digest: Mapping[bytes, Principal]
    #: Names of the entries that carry a plaintext ``key`` (warned about, never logged).
    plaintext: tuple[str, ...] = ()
    names: frozenset[str] = field(default_factory=frozenset)

    def merged(self, other: KeyTable, where: str) -> KeyTable:
        """Both tables in one; a name or key present in both is a ``ConfigError`` in ``where``."""
        for name in sorted(self.names & other.names):
            raise ConfigError(where, "keys", f"duplicate name {name!r} (also in the config's keys)")
        for digest, principal in other.by_digest.items():
            if digest in self.by_digest:
                raise ConfigError(
                    where,
                    "keys",
                    f"entry {principal.name!r} has the same key as {self.by_digest[digest].name!r}",
                )
        return KeyTable(
            {**self.by_digest, **other.by_digest}, self.plaintext + other.plaintext, self.names | other.names
        )

    def keeping(self, old: Mapping[bytes, Principal]) -> KeyTable:
        """This table with each principal that is unchanged since ``old`` (same key, same fields)
        replaced by its object in ``old``: principals compare by identity, and a reload should
        not make an unchanged caller a new one."""
        by_digest = {}
        for digest, principal in self.by_digest.items():
            before = old.get(digest)
            by_digest[digest] = before if before is not None and _same(before, principal) else principal
        return KeyTable(MappingProxyType(by_digest), self.plaintext, self.names)


def _same(a: Principal, b: Principal) -> bool:
    return (a.name, a.key_id, a.team, a.models, dict(a.limits), _plain(a.budgets), dict(a.metadata)) == (
        b.name,
        b.key_id,
        b.team,
        b.models,
        dict(b.limits),
        _plain(b.budgets),
        dict(b.metadata),
    )


def build_table(entries: Any, path: str, file: str) -> KeyTable:
    """Validate ``entries`` (the list under ``keys:``; ``path`` names it) into a :class:`KeyTable`."""
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ConfigError(file, path, f"must be a list of key entries, not {type(entries).__name__}")
    by_digest: dict[bytes, Principal] = {}
    plaintext: list[str] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        principal, digest, has_plaintext = _read_entry(Section(entry, where, file))
        if principal.name in names:
            raise ConfigError(file, f"{where}.name", f"duplicate name {principal.name!r}")
        if digest in by_digest:
            raise ConfigError(file, where, f"entry {principal.name!r} has the same key as {by_digest[digest].name!r}")
        names.add(principal.name)
        by_digest[digest] = principal
        if has_plaintext:
            plaintext.append(principal.name)
    return KeyTable(MappingProxyType(by_digest), tuple(plaintext), frozenset(names))


def _read_entry(sec: Section) -> tuple[Principal, bytes, bool]:
    name = sec.get("name", str, None, _check_name)
    if not name:
        raise sec.error("name", "is required (the principal's unique name)")
    key_hash = sec.get("key_hash", str, None)
    plain = sec.get("key", str, None)
    if key_hash is not None and plain is not None:
        raise sec.error("key", "give key_hash or key, not both")
    if key_hash is None and plain is None:
        raise sec.error("key_hash", "is required: sha256:<64 hex digits>, as `llmproxy keys hash` prints it")
    if plain is not None:
        if not plain.strip() or plain != plain.strip():
            raise sec.error("key", "must be a non-empty key without surrounding spaces")
        key_hash = hash_key(plain)
    else:
        assert key_hash is not None
        if _HASH.fullmatch(key_hash) is None:
            raise sec.error("key_hash", "must be sha256:<64 hex digits>, as `llmproxy keys hash` prints it")
        key_hash = key_hash.lower()
    team = sec.get("team", str, None, _check_name)
    models = sec.get("models", list, None)
    if models is not None and not (models and all(isinstance(m, str) and m for m in models)):
        raise sec.error("models", "must be a non-empty list of model names or fnmatch patterns (omit for any)")
    limits = sec.get("limits", dict, {})
    budgets = _budgets(sec)
    metadata = sec.get("metadata", dict, {})
    for label, value in metadata.items():
        if not isinstance(label, str) or not isinstance(value, str):
            raise sec.error(f"metadata.{label}", "must map strings to strings")
    sec.finish()
    principal = Principal(
        name=name,
        key_id=key_id(key_hash),
        team=team,
        models=tuple(models or ()),
        limits=MappingProxyType(limits),
        budgets=budgets,
        metadata=MappingProxyType(metadata),
    )
    if limits or budgets:
        try:  # the ratelimit filter's schema, checked now rather than at the first request
            principal_rules(name, limits, budgets)
        except ConfigError as exc:
            raise sec.error(exc.path, exc.reason) from None
    return principal, bytes.fromhex(key_hash[len(HASH_PREFIX) :]), plain is not None


def _budgets(sec: Section) -> Mapping[str, Any] | tuple[Mapping[str, Any], ...]:
    """``budgets``: one budget mapping, or a list of them (several budgets, each enforced)."""
    raw = sec.get("budgets", (dict, list), {})
    if isinstance(raw, dict):
        return MappingProxyType(raw)
    if not all(isinstance(item, dict) for item in raw):
        raise sec.error("budgets", "must be a budget mapping or a list of budget mappings")
    return tuple(MappingProxyType(item) for item in raw)


def _plain(budgets: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Any:
    return dict(budgets) if isinstance(budgets, Mapping) else [dict(b) for b in budgets]


def _check_name(value: str) -> str | None:
    if _NAME.fullmatch(value) is None:
        return "must be 1-128 letters, digits or _ . @ : + - (it appears in logs and metrics)"
    return None


def load_keys_file(path: Path) -> KeyTable:
    """Read a keys file (a mapping with one field, ``keys:``, the same list as in the config).

    Blocking (file I/O): call it off the event loop once serving. Raises
    ``ConfigError`` naming the file, the field and the reason.
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read keys file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "keys file is not UTF-8 text") from None
    raw = read_yaml(text, file)
    top = Section(raw, "", file)
    entries = top.get("keys", list, None)
    top.finish()
    if entries is None:
        raise top.error("keys", "is required (a list of key entries; an empty list refuses every key)")
    return build_table(entries, "keys", file)
