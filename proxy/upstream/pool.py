"""The pool policy of one upstream origin: synchronous, no I/O (as httpcore's ``connection_pool.py``).

Idle connections are reused newest first; a connection idle longer than
``keepalive_expiry``, closed by the peer, or whose last exchange saw an error
or did not finish its body is never reused; at most ``max_connections``
connections exist, and callers beyond that wait in line: a released
connection or a freed slot goes to the oldest waiter, and a new caller takes
nothing while older ones wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
import time
from collections import deque

from llmproxy.upstream.connection import ConnState, UpstreamConnection

__all__ = ["Grant", "OriginPool"]


class Grant(enum.Enum):
    """What a caller of the pool is granted besides an idle connection."""

    SLOT = "slot"  # room for one new connection, reserved for this caller: connect it


class OriginPool:
    """Connections to one origin; the policy is synchronous and does no I/O.

    Invariants: ``len(active) + len(idle) + reserved <= max_connections``
    (``reserved`` counts slots granted to callers that have not started their
    connection yet); a connection or slot that becomes free goes at once to
    the oldest waiter, so ``waiters`` is non-empty only while nothing is free,
    and a new caller never takes an idle connection or a slot while older
    callers wait (FIFO). A waiter that gives up (:meth:`withdraw`) hands a
    grant it received but did not use to the next one, so nothing is lost to
    a timeout or a cancellation.
    """

    def __init__(
        self,
        key: tuple[str, str, int, bool, str | None],
        max_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.key = key
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self.idle: list[UpstreamConnection] = []
        self.active: set[UpstreamConnection] = set()
        self.reserved = 0
        self.waiters: deque[asyncio.Future[UpstreamConnection | Grant]] = deque()

    def __repr__(self) -> str:
        return (
            f"<OriginPool {self.key[0]}://{self.key[1]}:{self.key[2]} active={len(self.active)}"
            f" idle={len(self.idle)} reserved={self.reserved} waiting={len(self.waiters)}>"
        )

    def acquire(self, now: float) -> UpstreamConnection | Grant | None:
        """Serve a new caller at once: an idle connection, a reserved slot, or None (then :meth:`queue`)."""
        if self.waiters:
            return None  # older callers first
        conn = self.take_idle(now)
        if conn is not None:
            return conn
        if self.has_room():
            self.reserved += 1
            return Grant.SLOT
        return None

    def queue(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[UpstreamConnection | Grant]:
        """Wait in line; the future's result is the caller's grant (see :meth:`acquire`)."""
        waiter: asyncio.Future[UpstreamConnection | Grant] = loop.create_future()
        self.waiters.append(waiter)
        return waiter

    def withdraw(self, waiter: asyncio.Future[UpstreamConnection | Grant]) -> None:
        """``waiter`` gave up (timeout, cancellation): leave the line, pass on what it was granted."""
        if not waiter.done() or waiter.cancelled():
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            return
        grant = waiter.result()
        if grant is Grant.SLOT:
            self.reserved -= 1
            self._grant_slot()
        else:
            self.active.discard(grant)
            self._offer(grant)

    def take_idle(self, now: float) -> UpstreamConnection | None:
        """Pop the newest usable idle connection, dropping expired or closed ones."""
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since > self.keepalive_expiry or not conn.idle_usable():
                conn.abort()
                continue
            conn.state = ConnState.ACTIVE
            self.active.add(conn)
            return conn
        return None

    def has_room(self) -> bool:
        return len(self.active) + len(self.idle) + self.reserved < self.max_connections

    def start_connection(self, conn: UpstreamConnection) -> None:
        """A reserved slot becomes ``conn``, being connected."""
        self.reserved -= 1
        self.active.add(conn)

    def release(self, conn: UpstreamConnection) -> None:
        """The exchange on ``conn`` ended: reuse it (oldest waiter first, else idle) or close it."""
        self.active.discard(conn)
        if conn.state is not ConnState.CLOSED and conn.reusable():
            conn.reset_for_reuse()
            self._offer(conn)
        else:
            conn.abort()
            self._grant_slot()

    def forget(self, conn: UpstreamConnection) -> None:
        """Called when the peer closed ``conn``."""
        if conn in self.active:
            return  # its user will release it and see the error
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._grant_slot()

    def _next_waiter(self) -> asyncio.Future[UpstreamConnection | Grant] | None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled one is skipped (its withdraw finds nothing to pass on)
                return waiter
        return None

    def _offer(self, conn: UpstreamConnection) -> None:
        """A reset connection is free: to the oldest waiter, else idle."""
        if not conn.idle_usable():
            conn.abort()
            self._grant_slot()
            return
        waiter = self._next_waiter()
        if waiter is None:
            conn.state = ConnState.IDLE
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
            return
        conn.state = ConnState.ACTIVE
        self.active.add(conn)
        waiter.set_result(conn)

    def _grant_slot(self) -> None:
        """A slot may be free: reserve it for the oldest waiter."""
        if self.waiters and self.has_room():
            waiter = self._next_waiter()
            if waiter is not None:
                self.reserved += 1
                waiter.set_result(Grant.SLOT)

    def expire_idle(self, now: float) -> None:
        keep = []
        for conn in self.idle:
            if now - conn.idle_since > self.keepalive_expiry or not conn.idle_usable():
                conn.abort()
            else:
                keep.append(conn)
        freed = len(self.idle) - len(keep)
        self.idle = keep
        for _ in range(freed):
            self._grant_slot()
