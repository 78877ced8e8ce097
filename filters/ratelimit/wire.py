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
from dataclasses import dataclass
from datetime import UTC, datetime

from llmproxy import RateLimited

__all__ = ["BudgetExceeded", "Snapshot", "duration", "header_fields", "rfc3339"]


class BudgetExceeded(RateLimited):
    """429 ``insufficient_quota``: a budget is spent (OpenAI's type and code for it)."""

    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The tightest counter of one kind (requests or tokens) after admission."""

    limit: int
    remaining: int
    #: Seconds until the counter is back to its full limit.
    reset: float


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


def rfc3339(seconds_from_now: float) -> str:
    """The instant ``seconds_from_now`` as RFC 3339 UTC (``2026-12-03T07:10:00Z``)."""
    at = datetime.fromtimestamp(time.time() + seconds_from_now, UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def header_fields(
    protocol: str, requests: Snapshot | None, tokens: Snapshot | None, input_only: bool = False
) -> list[tuple[str, str]]:
    """The rate-limit fields for ``protocol`` (``openai`` or ``anthropic``)."""
    out: list[tuple[str, str]] = []
    if protocol == "anthropic":
        token_kind = "input-tokens" if input_only else "tokens"
        for kind, snap in (("requests", requests), (token_kind, tokens)):
            if snap is not None:
                out += [
                    (f"anthropic-ratelimit-{kind}-limit", str(snap.limit)),
                    (f"anthropic-ratelimit-{kind}-remaining", str(snap.remaining)),
                    (f"anthropic-ratelimit-{kind}-reset", rfc3339(snap.reset)),
                ]
        return out
    for kind, snap in (("requests", requests), ("tokens", tokens)):
        if snap is not None:
            out += [
                (f"x-ratelimit-limit-{kind}", str(snap.limit)),
                (f"x-ratelimit-remaining-{kind}", str(snap.remaining)),
                (f"x-ratelimit-reset-{kind}", duration(snap.reset)),
            ]
    return out
