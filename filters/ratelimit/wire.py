"""What clients see of limits: the rate-limit header fields and the 429 errors.

OpenAI clients get ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
with resets as durations (``6m0s``, ``1.5s``, ``20ms``, OpenAI's format);
Anthropic clients get ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``
with resets as RFC 3339 instants (UTC). A refusal is a 429 with ``retry-after``
(whole seconds, rounded up) and the same fields; a budget refusal has code
``insufficient_quota`` (OpenAI's), a refusal that can never succeed (the
request alone is larger than the limit) has no ``retry-after``.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from llmproxy import QuotaState, RateLimited

__all__ = [
    "FIELD_NAMES",
    "BudgetExceeded",
    "FieldMaker",
    "as_text",
    "duration",
    "header_fields",
    "reset_duration",
    "reset_instant",
]


class BudgetExceeded(RateLimited):
    """429 ``insufficient_quota``: a budget is spent (OpenAI's type and code for it)."""

    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


def duration(seconds: float) -> str:
    """OpenAI's reset duration: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = int(seconds)
    frac = seconds - whole
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs + frac:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"


#: :func:`reset_duration` texts already made, by whole milliseconds (below 1 s) or seconds.
_RESETS: dict[int, bytes] = {}


def reset_duration(seconds: float) -> bytes:
    """The ``x-ratelimit-reset-*`` value for ``seconds``: milliseconds below one second,
    else whole seconds rounded up (never earlier than the real reset), as :func:`duration`
    writes them; cached, since a header field is written on every response."""
    key = -math.ceil(seconds * 1000) if seconds < 1 else math.ceil(seconds)
    text = _RESETS.get(key)
    if text is None:
        if len(_RESETS) >= 8192:
            _RESETS.clear()
        text = _RESETS[key] = duration(max(0, -key) / 1000 if key <= 0 else key).encode()
    return text


def reset_instant(seconds_from_now: float) -> bytes:
    """The ``anthropic-ratelimit-*-reset`` value: the instant ``seconds_from_now`` as RFC 3339
    UTC (``2026-12-03T07:10:00Z``), rounded up to the whole second (never earlier than the real
    reset); cached per second."""
    epoch = math.ceil(time.time() + seconds_from_now)
    text = _INSTANTS.get(epoch)
    if text is None:
        if len(_INSTANTS) >= 8192:
            _INSTANTS.clear()
        at = datetime.fromtimestamp(epoch, UTC)
        text = _INSTANTS[epoch] = at.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    return text


#: :func:`reset_instant` texts already made, by whole seconds since the epoch.
_INSTANTS: dict[int, bytes] = {}


_PARTS = ("limit", "remaining", "reset")


def _names(protocol: str, kind: str) -> tuple[bytes, bytes, bytes]:
    """The ``(limit, remaining, reset)`` field names of one counter kind in ``protocol``."""
    if protocol == "anthropic":
        limit, remaining, reset = (f"anthropic-ratelimit-{kind}-{part}".encode() for part in _PARTS)
    else:
        limit, remaining, reset = (f"x-ratelimit-{part}-{kind}".encode() for part in _PARTS)
    return limit, remaining, reset


#: ``(limit, remaining, reset)`` names per client protocol and counter kind.
_NAMES = {
    ("anthropic", "requests"): _names("anthropic", "requests"),
    ("anthropic", "tokens"): _names("anthropic", "tokens"),
    ("anthropic", "input-tokens"): _names("anthropic", "input-tokens"),
    ("openai", "requests"): _names("openai", "requests"),
    ("openai", "tokens"): _names("openai", "tokens"),
}

#: Every field :func:`header_fields` may write, by client protocol: a response drops the
#: upstream's own values of these before the proxy's are added.
FIELD_NAMES: dict[str, frozenset[bytes]] = {
    protocol: frozenset(name for (proto, _kind), names in _NAMES.items() if proto == protocol for name in names)
    for protocol in ("anthropic", "openai")
}


def header_fields(
    protocol: str, requests: QuotaState | None, tokens: QuotaState | None, input_only: bool = False
) -> list[tuple[bytes, bytes]]:
    """The rate-limit fields for ``protocol`` (``anthropic``, else OpenAI's) from the tightest
    requests and tokens counters after admission, as lowercase
    byte names and ASCII values that are valid header fields by construction (numbers,
    durations, RFC 3339 instants), ready for :meth:`llmproxy.Headers.edit_raw`."""
    out: list[tuple[bytes, bytes]] = []
    anthropic = protocol == "anthropic"
    proto = "anthropic" if anthropic else "openai"
    token_kind = "input-tokens" if anthropic and input_only else "tokens"
    for kind, snap in (("requests", requests), (token_kind, tokens)):
        if snap is not None:
            limit, remaining, reset = _NAMES[proto, kind]
            when = reset_instant(snap.reset) if anthropic else reset_duration(snap.reset)
            out += ((limit, b"%d" % snap.limit), (remaining, b"%d" % snap.remaining), (reset, when))
    return out


class FieldMaker:
    """:func:`header_fields` for one protocol and fixed counters, the static parts made once: the
    names and the limits' texts; a response then only writes ``remaining`` and ``reset``."""

    __slots__ = ("_anthropic", "_requests", "_tokens")

    def __init__(self, protocol: str, requests_limit: int | None, tokens_limit: int | None, input_only: bool) -> None:
        anthropic = protocol == "anthropic"
        proto = "anthropic" if anthropic else "openai"
        token_kind = "input-tokens" if anthropic and input_only else "tokens"
        self._anthropic = anthropic

        def part(kind: str, limit: int | None) -> tuple[tuple[bytes, bytes], bytes, bytes] | None:
            if limit is None:
                return None
            name, remaining, reset = _NAMES[proto, kind]
            return (name, b"%d" % limit), remaining, reset

        self._requests = part("requests", requests_limit)
        self._tokens = part(token_kind, tokens_limit)

    def fields(self, requests: QuotaState | None, tokens: QuotaState | None) -> list[tuple[bytes, bytes]]:
        """The fields for the counters' states (the ones this maker was made for)."""
        reset_text = reset_instant if self._anthropic else reset_duration
        out: list[tuple[bytes, bytes]] = []
        made = self._requests
        if made is not None and requests is not None:
            left = requests.limit - requests.used
            out += (made[0], (made[1], b"%d" % (left if left > 0 else 0)), (made[2], reset_text(requests.reset)))
        made = self._tokens
        if made is not None and tokens is not None:
            left = tokens.limit - tokens.used
            out += (made[0], (made[1], b"%d" % (left if left > 0 else 0)), (made[2], reset_text(tokens.reset)))
        return out


def as_text(fields: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """``fields`` as text pairs (for an error's extra headers)."""
    return [(name.decode("ascii"), value.decode("ascii")) for name, value in fields]
