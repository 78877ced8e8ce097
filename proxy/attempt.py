"""One upstream try: :class:`Attempt`, created and finished by the core.

An exchange makes one attempt per upstream try (the first, and each retry a
filter asks for). The core creates the attempt when it sends the request
and finishes it exactly once, on every path, with an :class:`Outcome`;
then it calls every filter's ``on_attempt_complete(exchange, attempt)``::

    send ──> response head ──> body relayed to its end ──> COMPLETED
      │            │                   └─ error after the head ──> FAILED
      │            ├─ a filter asked for a retry ─────────────────> RETRIED
      │            └─ a filter replied locally instead ───────────> ABANDONED
      ├─ upstream error, presented as a synthesized response ─────> FAILED (or RETRIED)
      └─ client gone / exchange cancelled at any point ───────────> ABANDONED

A tracing filter hangs one client span on each attempt; a limiter releases
the reservation of a retried one. ``head_sent`` says whether this attempt's
response head went downstream (at most one attempt of an exchange has it).
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmproxy.errors import ProxyError
    from llmproxy.exchange import Response
    from llmproxy.upstream import UpstreamTarget
    from llmproxy.usage import Usage

__all__ = ["Attempt", "Outcome"]


class Outcome(enum.Enum):
    """How an attempt ended."""

    #: Not finished yet.
    PENDING = "pending"
    #: Its response (whatever its status) was relayed to the client to its end.
    COMPLETED = "completed"
    #: A filter asked for another attempt; nothing of this one reached the client.
    RETRIED = "retried"
    #: An error ended it (``attempt.error``): before the head (then the client got
    #: the error's envelope, unless a retry followed) or mid-body.
    FAILED = "failed"
    #: The exchange ended without finishing it: the client went away, or a filter
    #: answered with a local reply instead.
    ABANDONED = "abandoned"


class Attempt:
    """One upstream try of an exchange (see the module docstring)."""

    __slots__ = (
        "ended_at",
        "error",
        "finish_reasons",
        "head_sent",
        "is_sse",
        "key_id",
        "number",
        "outcome",
        "responded_at",
        "response",
        "response_id",
        "response_model",
        "started_at",
        "target",
        "usage",
    )

    def __init__(self, number: int, target: UpstreamTarget) -> None:
        #: 1 for the first attempt of the exchange, 2 for the first retry, ...
        self.number = number
        #: Where it went.
        self.target = target
        #: The provider key's short id (``UpstreamTarget.key_id``; "" when the target has none).
        self.key_id = target.key_id
        #: The response head as the hooks saw it (synthesized from the error on an upstream failure).
        self.response: Response | None = None
        #: The upstream error (or the error raised while relaying) that failed it.
        self.error: ProxyError | None = None
        self.is_sse = False
        #: This attempt's response head was written downstream.
        self.head_sent = False
        self.outcome = Outcome.PENDING
        #: Tokens spent by this attempt (:class:`~llmproxy.usage.Usage`): set by
        #: routing from the provider's report, completed by ``metering``.
        self.usage: Usage | None = None
        #: What the provider's response said about itself (its ``id``, ``model`` and the
        #: finish / stop reasons, in order), read by routing with byte searches on the
        #: provider's side of a translation; None / empty when it was not read (an error
        #: status, an API routing does not meter, no routing in the chain).
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reasons: tuple[str, ...] = ()
        self.started_at = time.perf_counter()
        #: ``time.perf_counter()`` when the upstream's response head arrived (or its failure
        #: before one); 0 before that. Minus ``started_at``: the provider's time to its head.
        self.responded_at = 0.0
        self.ended_at = 0.0

    @property
    def status(self) -> int | None:
        """The response status the hooks saw, or None before the head."""
        return self.response.status if self.response is not None else None

    @property
    def duration(self) -> float:
        """Seconds from send to finish (to now while pending)."""
        return (self.ended_at or time.perf_counter()) - self.started_at

    def finish(self, outcome: Outcome, error: ProxyError | None = None) -> bool:
        """Record the outcome; False (and nothing changes) when already finished. For the core."""
        if self.outcome is not Outcome.PENDING:
            return False
        self.outcome = outcome
        if error is not None:
            self.error = error
        self.ended_at = time.perf_counter()
        return True

    def __repr__(self) -> str:
        return f"<Attempt {self.number} {self.target.name} {self.outcome.value} status={self.status}>"
