"""A small mutable header list with case-insensitive lookup.

Headers are kept as h11 hands them over: a list of ``(name, value)`` byte
pairs with lowercase names, in wire order, duplicates allowed. The public
methods take and return ``str`` (latin-1, as HTTP/1.1 defines field bytes),
because that is what filter authors write; the raw list is what the core
passes to h11 without copying.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["HOP_BY_HOP", "Headers", "check_field", "comma_tokens", "fields_of"]

_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
#: A field value holds no control character but HTAB (RFC 9110 5.5: CR, LF and NUL
#: would break the head; other controls and DEL are refused as the parser refuses them).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")


def check_field(name: bytes, value: bytes) -> None:
    """Refuse a field that would break or inject into the serialised head.

    Everything added through :class:`Headers` passes here, so the core can
    hand headers to h11 as already validated (parsed fields were validated
    by h11 when they were read).
    """
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"invalid header name {name!r}")
    if _BAD_VALUE.search(value) is not None:
        raise ValueError(f"invalid value for header {name.decode('latin-1')!r}")


def fields_of(parsed: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The ``(lowercase name, value)`` pairs of an h11 event's headers, as a new list.

    h11's ``Headers`` is a ``Sequence`` whose iteration goes through
    ``__getitem__`` once per field; on the hot path its ``_full_items``
    triples are read directly, with the public iteration as the fallback
    should a future h11 store them differently.
    """
    full = getattr(parsed, "_full_items", None)
    if type(full) is list:
        return [(name, value) for _, name, value in full]
    return list(parsed)


def comma_tokens(value: bytes) -> set[bytes]:
    """The lowercase tokens of a comma-separated field value (``Connection: keep-alive, Close``)."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


#: Connection-specific headers (RFC 9110 section 7.6.1) that a proxy never forwards.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


class Headers:
    """Ordered, case-insensitive, multi-valued HTTP headers."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._items: list[tuple[bytes, bytes]] = list(items)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> Headers:
        """Build from ``str`` pairs (names are lowercased)."""
        return cls((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        key = name.lower().encode("latin-1")
        for k, v in self._items:
            if k == key:
                return v.decode("latin-1")
        return default

    def get_raw(self, name: bytes) -> bytes | None:
        """The first value of lowercase ``name`` as bytes (no decoding; for the core)."""
        for k, v in self._items:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self._items if k == key]

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one ``value``."""
        key = name.lower().encode("latin-1")
        raw = value.encode("latin-1")
        check_field(key, raw)
        self._items = [(k, v) for k, v in self._items if k != key]
        self._items.append((key, raw))

    def set_raw(self, name: bytes, value: bytes) -> None:
        """Like :meth:`set` for lowercase byte names (for the core)."""
        check_field(name, value)
        self._items = [(k, v) for k, v in self._items if k != name]
        self._items.append((name, value))

    def add(self, name: str, value: str) -> None:
        """Append one more value of ``name``."""
        key, raw = name.lower().encode("latin-1"), value.encode("latin-1")
        check_field(key, raw)
        self._items.append((key, raw))

    def edit_raw(self, drop: frozenset[bytes], append: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Remove every field named in ``drop``, then append ``append``, in one pass.

        For edits prepared once (from config): names are lowercase bytes and
        the appended fields must already have passed :func:`check_field`.
        """
        if drop:
            self._items = [kv for kv in self._items if kv[0] not in drop]
        self._items.extend(append)

    def remove(self, name: str) -> None:
        """Remove every value of ``name`` (no error when absent)."""
        key = name.lower().encode("latin-1")
        self._items = [(k, v) for k, v in self._items if k != key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return self.get_raw(name.lower().encode("latin-1")) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for k, v in self._items:
            yield k.decode("latin-1"), v.decode("latin-1")

    def __len__(self) -> int:
        return len(self._items)

    def raw(self) -> list[tuple[bytes, bytes]]:
        """The underlying list of ``(lowercase name, value)`` byte pairs (not a copy)."""
        return self._items

    def __repr__(self) -> str:
        return f"Headers({[(k.decode('latin-1'), '...') for k, _ in self._items]})"
