"""The upstream pool's policy, asserted on its ``repr`` (as httpcore's pool tests do).

:class:`proxy.upstream._OriginPool` keeps its policy synchronous and free of
I/O, so most of these drive it directly with a tiny fake connection (only
what the policy asks of a connection: ``state``, ``idle_since``,
``idle_usable()``, ``reusable()``, ``reset_for_reuse()``, ``abort()``) and
waiters that are plain futures of a loop that never runs. Time is passed in
(``acquire(now)``, ``take_idle(now)``, ``expire_idle(now)``); nothing sleeps.
The last test uses a real loopback connection: one closed by the peer while
idle leaves the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from llmproxy.upstream import UpstreamPool, UpstreamTarget, _ConnState, _Grant, _OriginPool, _UpstreamConnection

from ..support import LoopThread

ORIGIN = ("http", "127.0.0.1", 8080, False, None)
EXPIRY = 5.0
Waiter = asyncio.Future[_UpstreamConnection | _Grant]


class FakeConn:
    """What the policy needs of a connection, and nothing else."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = _ConnState.ACTIVE
        self.idle_since = 0.0
        self.reused = False
        self.aborted = False
        #: the exchange on it ended cleanly (else release closes it)
        self.clean = True
        #: the peer closed it (not yet noticed by connection_lost)
        self.peer_closed = False

    def __repr__(self) -> str:
        return f"<FakeConn {self.name} {self.state.value}>"

    def idle_usable(self) -> bool:
        return self.state is not _ConnState.CLOSED and not self.peer_closed

    def reusable(self) -> bool:
        return self.clean and self.idle_usable()

    def reset_for_reuse(self) -> None:
        self.reused = True

    def abort(self) -> None:
        self.state = _ConnState.CLOSED
        self.aborted = True


def conn(name: str) -> _UpstreamConnection:
    return cast(_UpstreamConnection, FakeConn(name))


def fake(c: Any) -> FakeConn:
    assert isinstance(c, FakeConn)
    return c


def state(active: int = 0, idle: int = 0, reserved: int = 0, waiting: int = 0) -> str:
    return f"<OriginPool http://127.0.0.1:8080 active={active} idle={idle} reserved={reserved} waiting={waiting}>"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop for the waiters' futures; it never runs (the policy is synchronous)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def pool_of(cap: int) -> _OriginPool:
    pool = _OriginPool(ORIGIN, cap, EXPIRY, None)
    assert repr(pool) == state()
    return pool


def connected(pool: _OriginPool, name: str) -> _UpstreamConnection:
    """A new caller gets a slot and connects in it."""
    assert pool.acquire(time.monotonic()) is _Grant.SLOT
    c = conn(name)
    pool.start_connection(c)
    return c


# -- the per-origin cap -------------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_slots_are_reserved_up_to_the_cap_then_callers_wait(cap: int, loop: asyncio.AbstractEventLoop) -> None:
    pool = pool_of(cap)
    for n in range(1, cap + 1):
        assert pool.acquire(0.0) is _Grant.SLOT
        assert repr(pool) == state(reserved=n)
    assert pool.acquire(0.0) is None
    assert repr(pool) == state(reserved=cap)
    pool.queue(loop)
    assert repr(pool) == state(reserved=cap, waiting=1)
    pool.start_connection(conn("a"))
    assert repr(pool) == state(active=1, reserved=cap - 1, waiting=1)


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_active_idle_and_reserved_together_never_pass_the_cap(cap: int, loop: asyncio.AbstractEventLoop) -> None:
    pool = pool_of(cap + 1)
    pool.max_connections = cap
    conns = [connected(pool, str(i)) for i in range(cap)]
    pool.release(conns[0])  # idle now: counts against the cap like an active one
    assert repr(pool) == state(active=cap - 1, idle=1)
    assert not pool.has_room()
    assert pool.acquire(0.0) is conns[0]  # the idle one, not a new slot
    assert repr(pool) == state(active=cap)
    assert pool.acquire(0.0) is None


# -- queue order -------------------------------------------------------------------


def test_waiters_are_served_in_arrival_order(loop: asyncio.AbstractEventLoop) -> None:
    pool = pool_of(1)
    a = connected(pool, "a")
    waiters = [pool.queue(loop) for _ in range(3)]
    assert repr(pool) == state(active=1, waiting=3)
    served = []
    for left in (2, 1, 0):
        pool.release(a)  # the connection goes straight to the oldest waiter, never idle
        assert repr(pool) == state(active=1, waiting=left)
        done = [i for i, w in enumerate(waiters) if w.done()]
        served.append(done[-1])
        assert waiters[done[-1]].result() is a
    assert served == [0, 1, 2]
    pool.release(a)
    assert repr(pool) == state(idle=1)


def test_a_new_caller_does_not_jump_the_line(loop: asyncio.AbstractEventLoop) -> None:
    pool = pool_of(1)
    a = connected(pool, "a")
    first = pool.queue(loop)
    # a connection is idle for an instant only if nobody waits: with a waiter, a
    # newcomer is refused even though has_room() may be true again
    assert pool.acquire(0.0) is None
    pool.release(a)
    assert first.result() is a
    assert repr(pool) == state(active=1)


def test_a_closed_connection_passes_its_slot_to_the_oldest_waiter(loop: asyncio.AbstractEventLoop) -> None:
    pool = pool_of(1)
    a = connected(pool, "a")
    first, second = pool.queue(loop), pool.queue(loop)
    fake(a).clean = False  # e.g. Connection: close, or a body cut short
    pool.release(a)
    assert fake(a).aborted
    assert (first.result(), second.done()) == (_Grant.SLOT, False)
    assert repr(pool) == state(reserved=1, waiting=1)


# -- reuse -------------------------------------------------------------------------


def test_the_newest_idle_connection_is_reused_first() -> None:
    pool = pool_of(3)
    a, b, c = (connected(pool, n) for n in "abc")
    for each in (a, b, c):
        pool.release(each)
    assert repr(pool) == state(idle=3)
    assert all(fake(x).reused for x in (a, b, c))
    now = time.monotonic()
    assert [pool.take_idle(now) for _ in range(3)] == [c, b, a]
    assert repr(pool) == state(active=3)
    assert pool.take_idle(now) is None


# -- idle expiry -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "kept"),
    [(0.0, True), (EXPIRY - 0.01, True), (EXPIRY, True), (EXPIRY + 0.01, False), (10 * EXPIRY, False)],
    ids=["fresh", "just-inside", "at-expiry", "just-past", "long-past"],
)
def test_idle_connections_expire_after_keepalive_expiry(age: float, kept: bool) -> None:
    pool = pool_of(2)
    a = connected(pool, "a")
    pool.release(a)
    since = fake(a).idle_since
    assert since > 0.0  # stamped (time.monotonic()) when it went idle

    pool.expire_idle(since + age)
    assert repr(pool) == state(idle=1 if kept else 0)
    assert fake(a).aborted is not kept


@pytest.mark.parametrize(("age", "kept"), [(EXPIRY, True), (EXPIRY + 0.01, False)], ids=["at-expiry", "past"])
def test_an_expired_idle_connection_is_dropped_when_taken(age: float, kept: bool) -> None:
    pool = pool_of(2)
    a = connected(pool, "a")
    pool.release(a)
    got = pool.acquire(fake(a).idle_since + age)
    if kept:
        assert got is a and repr(pool) == state(active=1)
    else:
        assert got is _Grant.SLOT and fake(a).aborted  # closed, and its slot given to the caller
        assert repr(pool) == state(reserved=1)


def test_take_idle_skips_expired_ones_for_a_fresh_one_under_them() -> None:
    pool = pool_of(3)
    a, b = connected(pool, "a"), connected(pool, "b")
    pool.release(a)
    pool.release(b)
    fake(b).idle_since = fake(a).idle_since - 2 * EXPIRY  # b, on top, is stale
    assert pool.take_idle(fake(a).idle_since + 1.0) is a
    assert fake(b).aborted
    assert repr(pool) == state(active=1)


# -- giving up while waiting (timeout, cancellation) -------------------------------


def test_a_waiter_cancelled_before_any_grant_just_leaves(loop: asyncio.AbstractEventLoop) -> None:
    pool = pool_of(1)
    a = connected(pool, "a")
    gone, stays = pool.queue(loop), pool.queue(loop)
    pool.withdraw(gone)
    assert gone.cancelled()
    assert repr(pool) == state(active=1, waiting=1)
    pool.release(a)
    assert stays.result() is a
    assert repr(pool) == state(active=1)


def test_a_waiter_cancelled_after_the_loop_cancelled_its_future_passes_nothing_on(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool = pool_of(1)
    a = connected(pool, "a")
    gone, stays = pool.queue(loop), pool.queue(loop)
    gone.cancel()  # asyncio cancelled the task awaiting it; withdraw comes later
    pool.release(a)  # the cancelled waiter is skipped
    assert stays.result() is a
    pool.withdraw(gone)
    assert repr(pool) == state(active=1)


@pytest.mark.parametrize("granted", ["connection", "slot"])
@pytest.mark.parametrize("others", [0, 2])
def test_a_waiter_that_gives_up_after_being_granted_passes_the_grant_on(
    loop: asyncio.AbstractEventLoop, granted: str, others: int
) -> None:
    pool = pool_of(1)
    a = connected(pool, "a")
    gone = pool.queue(loop)
    rest = [pool.queue(loop) for _ in range(others)]
    if granted == "slot":
        fake(a).clean = False
    pool.release(a)  # granted, but its task was cancelled (or timed out) before it ran
    grant = gone.result()
    assert grant is (a if granted == "connection" else _Grant.SLOT)
    pool.withdraw(gone)
    if others:
        assert rest[0].result() is grant and not rest[1].done()
        held = state(active=1, waiting=1) if granted == "connection" else state(reserved=1, waiting=1)
        assert repr(pool) == held
    else:
        # nobody left: the connection goes idle, the slot is simply free
        assert repr(pool) == (state(idle=1) if granted == "connection" else state())


# -- closed by the peer while idle --------------------------------------------------


def test_an_idle_connection_the_peer_closed_is_forgotten_and_its_slot_passed_on(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool = pool_of(2)
    a, b = connected(pool, "a"), connected(pool, "b")
    pool.release(a)
    assert repr(pool) == state(active=1, idle=1)
    fake(a).peer_closed = True
    fake(a).state = _ConnState.CLOSED  # connection_lost marks it closed, then tells the pool
    pool.forget(a)
    assert repr(pool) == state(active=1)
    pool.forget(b)  # an active one stays: its user releases it and sees the error
    assert repr(pool) == state(active=1)


def test_an_idle_connection_closed_but_not_yet_noticed_is_dropped_when_taken() -> None:
    pool = pool_of(2)
    a = connected(pool, "a")
    pool.release(a)
    fake(a).peer_closed = True  # the FIN is in, connection_lost has not run yet
    assert pool.acquire(fake(a).idle_since) is _Grant.SLOT
    assert fake(a).aborted
    assert repr(pool) == state(reserved=1)


def test_a_released_connection_the_peer_closed_is_not_kept_idle(loop: asyncio.AbstractEventLoop) -> None:
    pool = pool_of(1)
    a = connected(pool, "a")
    waiter = pool.queue(loop)
    fake(a).peer_closed = True
    pool.release(a)
    assert waiter.result() is _Grant.SLOT  # the waiter connects afresh
    assert repr(pool) == state(reserved=1)


def test_a_real_connection_closed_by_the_peer_while_idle_leaves_the_pool(loop_thread: LoopThread) -> None:
    async def run() -> list[str]:
        release = asyncio.Event()

        async def serve_once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await release.wait()  # until the client's connection is idle in the pool
            writer.close()

        server = await asyncio.start_server(serve_once_then_close, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(max_per_origin=2)
        target = UpstreamTarget.from_url("t", f"http://127.0.0.1:{port}")
        seen = []
        try:
            response = await pool.send(target, b"GET", b"/", [(b"host", target.host_header)], b"")
            assert await response.read() == b"ok"
            response.release()
            seen.append(repr(pool))
            origin = pool._pools[target.pool_key]
            forgotten = asyncio.Event()
            forget = origin.forget

            def noting_forget(c: _UpstreamConnection) -> None:
                forget(c)
                forgotten.set()

            origin.forget = noting_forget  # type: ignore[method-assign,assignment]
            release.set()
            async with asyncio.timeout(5):
                await forgotten.wait()  # connection_lost told the pool
            seen.append(repr(pool))
        finally:
            await pool.close()
            server.close()
            await server.wait_closed()
        return seen

    idle, after = loop_thread.call(run())
    assert idle.startswith("<UpstreamPool [<OriginPool http://127.0.0.1:")
    assert idle.endswith("active=0 idle=1 reserved=0 waiting=0>]>")
    assert after.endswith("active=0 idle=0 reserved=0 waiting=0>]>")
