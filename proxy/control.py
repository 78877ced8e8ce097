"""What filter hooks ask of the core, in one chain-owned object per exchange.

Filters never touch this directly: they call the :class:`~llmproxy.exchange.Exchange`
methods (``send_local_reply``, ``retry``, ``set_response_data``,
``skip_response_body``), which record the request here; the chain runner and
the exchange driver read it. Per-attempt requests (a retry, the filters that
sit out a body) are reset by :meth:`HookControl.new_attempt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmproxy.exchange import LocalReply

__all__ = ["HookControl"]


class HookControl:
    """The requests filters made of the core, per exchange (and per attempt)."""

    __slots__ = ("end_body", "local_reply", "response_data", "retry", "skipped")

    def __init__(self) -> None:
        #: A reply to send instead of (or before) the upstream's.
        self.local_reply: LocalReply | None = None
        #: A retry was asked for in the current attempt.
        self.retry = False
        #: Filters (by object id) whose response-body hook sits out the current attempt's body.
        self.skipped: set[int] | None = None
        #: The replacement of the data passed on by the body hook running now.
        self.response_data: bytes | None = None
        #: A body hook ended the current attempt's response body early.
        self.end_body = False

    def new_attempt(self) -> None:
        """Forget the previous attempt's retry request and skips: each attempt's hooks decide again."""
        self.retry = False
        self.skipped = None
        self.end_body = False

    def __repr__(self) -> str:
        return (
            f"<HookControl local_reply={self.local_reply is not None} retry={self.retry}"
            f" skipped={len(self.skipped or ())}>"
        )
