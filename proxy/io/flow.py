"""Flow control of one transport, both ways, as one small object (as uvicorn's ``flow_control.py``).

A protocol owns one :class:`FlowControl` per transport and forwards the
transport's ``pause_writing``/``resume_writing`` callbacks to it; every
method is idempotent, so callers never track what was paused themselves:

* ``pause_reading()``/``resume_reading()`` stop and restart reading the
  socket (the client's pipelined bytes while a response is written; an
  upstream body nobody consumes past ``READ_HIGH_WATER``);
* ``drain(limit)`` waits while the transport has paused writing. It returns
  True when writing may go on: the transport resumed, or it closed
  (:meth:`close`), in which case the caller learns of the closure from its
  next read or write, as with ``asyncio.StreamWriter.drain`` on a lost peer.
  It returns False when ``limit`` seconds passed first (the peer stopped
  reading). Waiting costs a future only while paused, and a timer only when
  a timeout is given.

Nagle is off on every TCP transport without a call here: uvloop (and
asyncio's own loops) set ``TCP_NODELAY`` on accepted and connected TCP
sockets themselves (``tests/http/test_flow.py`` checks both sides), and
``transport.get_extra_info("socket")`` builds a socket object per call.
"""

from __future__ import annotations

import asyncio

__all__ = ["FlowControl"]


class FlowControl:
    """Read pausing and write draining of one transport (see the module docstring)."""

    __slots__ = ("_closed", "_loop", "_transport", "_waiter", "read_paused", "write_paused")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._closed = False
        self._waiter: asyncio.Future[bool] | None = None
        #: Reading the socket is paused (by :meth:`pause_reading`).
        self.read_paused = False
        #: The transport asked to stop writing (its buffer is past the high-water mark).
        self.write_paused = False

    def __repr__(self) -> str:
        return f"<FlowControl read_paused={self.read_paused} write_paused={self.write_paused} closed={self._closed}>"

    # -- reading -------------------------------------------------------------
    def pause_reading(self) -> None:
        """Stop reading the socket; no-op when paused already or closed."""
        if not self.read_paused and not self._closed:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the socket again; no-op when not paused or closed."""
        if self.read_paused:
            self.read_paused = False
            if not self._closed:
                self._transport.resume_reading()

    # -- writing (the transport's callbacks) --------------------------------
    def pause_writing(self) -> None:
        """From the protocol's ``pause_writing``: :meth:`drain` waits from now on."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """From the protocol's ``resume_writing``: wakes a :meth:`drain`."""
        self.write_paused = False
        self._wake(True)

    def close(self) -> None:
        """From the protocol's ``connection_lost``: a waiting :meth:`drain` returns True, later ones at once."""
        self._closed = True
        self.write_paused = False
        self.read_paused = False
        self._wake(True)

    def wake_drain(self) -> None:
        """End a waiting :meth:`drain` now (it returns True) as if writing resumed; no-op if none waits.

        For a writer with a reason to stop waiting: the peer answered already.
        """
        self._wake(True)

    @property
    def closed(self) -> bool:
        return self._closed

    async def drain(self, limit: float | None = None) -> bool:
        """Wait while writing is paused; True when it may go on, False if ``limit`` seconds passed first.

        One waiter at a time (the connection's one writer).
        """
        if not self.write_paused or self._closed:
            return True
        waiter = self._waiter = self._loop.create_future()
        expiry = None if limit is None else self._loop.call_later(max(limit, 0.0), self._wake, False)
        try:
            drained: bool = await waiter
            return drained
        finally:
            self._waiter = None
            if expiry is not None:
                expiry.cancel()

    def _wake(self, result: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
