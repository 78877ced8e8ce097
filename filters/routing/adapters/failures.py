"""What a provider's failed reply means, and how long to wait: shared by the adapters.

:class:`FailureKind` is the vocabulary :meth:`Adapter.classify` answers in and
the failover filter acts on (see its module docstring for what each does to a
key). :func:`retry_after` reads the wait a provider asks for from the headers
providers use for it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

__all__ = ["Failure", "FailureKind", "HeaderGet", "error_code", "retry_after"]

#: ``headers.get``: a header's value by lower-case name, or None.
HeaderGet = Callable[[str], "str | None"]


class FailureKind(enum.Enum):
    OK = "ok"
    #: 429 that will pass: cool the key for the provider's wait.
    RATE_LIMITED = "rate_limited"
    #: The key is out of credit or quota (OpenAI ``insufficient_quota``): eject it, it will not pass soon.
    QUOTA = "quota"
    #: 401/403: the key is refused: eject it.
    AUTH = "auth"
    #: The provider is overloaded (Anthropic 529 ``overloaded_error``, 503): retry elsewhere, count it.
    OVERLOADED = "overloaded"
    #: 5xx: counts against the key, retried.
    SERVER = "server"
    #: The request itself is at fault: not the key's failure, not retried.
    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH = "context_length"
    CONTENT_FILTER = "content_filter"


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    #: Seconds the provider asked to wait (None: it did not say).
    retry_after: float | None = None


_CODE = re.compile(rb'"(?:code|type)"\s*:\s*"([A-Za-z_]+)"')


def error_code(body_prefix: bytes) -> frozenset[str]:
    """The ``code`` / ``type`` string values in an error body's first bytes (a regex, no JSON parse)."""
    return frozenset(m.decode() for m in _CODE.findall(body_prefix))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: str) -> float | None:
    """``6m0s``, ``1.5s``, ``20ms`` (OpenAI's ``x-ratelimit-reset-*``) in seconds, or None."""
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def retry_after(get: HeaderGet, now: float) -> float | None:
    """Seconds to wait before the key is used again, from the reply's headers, or None.

    In order: ``retry-after-ms``; ``retry-after`` (seconds or an HTTP date);
    the longest of OpenAI's ``x-ratelimit-reset-requests`` / ``-tokens``
    (durations such as ``6m0s``) and Anthropic's ``anthropic-ratelimit-*-reset``
    (RFC 3339 times) for the limits that are exhausted (``remaining`` 0) or,
    when none says so, all of them.
    """
    value = get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    waits: list[float] = []
    spent: list[float] = []
    for kind in ("requests", "tokens"):
        value = get(f"x-ratelimit-reset-{kind}")
        wait = _duration(value) if value else None
        if wait is not None:
            waits.append(wait)
            if get(f"x-ratelimit-remaining-{kind}") == "0":
                spent.append(wait)
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        value = get(f"anthropic-ratelimit-{kind}-reset")
        if value:
            try:
                wait = max(0.0, datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() - now)
            except ValueError:
                continue
            waits.append(wait)
            if get(f"anthropic-ratelimit-{kind}-remaining") == "0":
                spent.append(wait)
    chosen = spent or waits
    return max(chosen) if chosen else None
