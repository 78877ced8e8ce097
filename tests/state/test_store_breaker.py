"""The shared store's circuit breaker: fail fast while Redis is known down.

The policy (:class:`proxy.store.CircuitBreaker`) is driven with an injected
clock; the :class:`~proxy.store_redis.RedisStore` that uses it is driven
against a frozen server of two kinds: a TCP listener that accepts and never
answers (so the test can count what reaches it), and a real ``redis-server``
stopped with SIGSTOP and resumed with SIGCONT. Timeouts are 0.1-0.2 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis

from llmproxy.state.redis import RedisStore
from llmproxy.state.store import BreakerState, CircuitBreaker, StoreUnavailable

from ..redis_server import REDIS_SERVER, SKIP_REASON, free_port, redis_url, start_redis_server, stop_redis_server

__all__ = ["redis_url"]  # re-exported so pytest sees the fixture in this module

CLOSED, OPEN, PROBING = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.PROBING


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the policy, with an injected clock -----------------------------------------------------


def _breaker_in(state: BreakerState, clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker(1.0, clock)
    if state is not CLOSED:
        breaker.trip("boom")
    if state is PROBING:
        breaker.begin_probe()
    assert breaker.state is state
    return breaker


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (CLOSED, "trip", OPEN),
        (OPEN, "trip", OPEN),
        (PROBING, "trip", PROBING),
        (OPEN, "begin_probe", PROBING),
        (PROBING, "probe_failed", OPEN),
        (PROBING, "probe_succeeded", CLOSED),
        (CLOSED, "reset", CLOSED),
        (OPEN, "reset", CLOSED),
        (PROBING, "reset", CLOSED),
        (CLOSED, "begin_probe", None),
        (CLOSED, "probe_failed", None),
        (CLOSED, "probe_succeeded", None),
        (OPEN, "probe_failed", None),
        (OPEN, "probe_succeeded", None),
        (PROBING, "begin_probe", None),  # one probe at a time
    ],
)
def test_breaker_transition_table(state: BreakerState, event: str, after: BreakerState | None) -> None:
    breaker = _breaker_in(state, Clock())
    step: Callable[[], object] = (lambda: breaker.trip("again")) if event == "trip" else getattr(breaker, event)
    if after is None:
        with pytest.raises(RuntimeError, match=event):
            step()
        assert breaker.state is state
    else:
        step()
        assert breaker.state is after
        assert breaker.closed is (after is CLOSED)


def test_breaker_schedules_probes_one_interval_apart() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2.0, clock)
    assert breaker.closed and breaker.wait() == 0 and breaker.trips == 0
    assert breaker.trip("first") is True
    assert (breaker.state, breaker.cause, breaker.trips, breaker.wait()) == (OPEN, "first", 1, 2.0)
    clock.now += 0.5
    assert breaker.trip("second") is False  # already open: the cause and the schedule stay
    assert (breaker.cause, breaker.trips, breaker.wait()) == ("first", 1, 1.5)
    clock.now += 1.5
    assert breaker.wait() == 0
    breaker.begin_probe()
    clock.now += 0.25  # the probe took a while
    breaker.probe_failed()
    assert (breaker.state, breaker.wait()) == (OPEN, 2.0)  # the next one an interval after the failure
    clock.now += 5  # late: due at once
    assert breaker.wait() == 0
    breaker.begin_probe()
    breaker.probe_succeeded()
    assert (breaker.state, breaker.cause, breaker.trips) == (CLOSED, "", 1)
    assert breaker.trip("third") is True and breaker.trips == 2
    assert repr(breaker) == "<CircuitBreaker open trips=2>"


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf")])
def test_breaker_refuses_a_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="probe_interval"):
        CircuitBreaker(interval)


# -- RedisStore against a listener that accepts and never answers -------------------------------


class FrozenServer:
    """Accepts connections and reads everything, never answers (a frozen Redis)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        while data := await reader.read(65536):
            self.received += data

    def commands(self, name: bytes) -> int:
        """How many RESP commands (or arguments) called ``name`` arrived, any case."""
        return bytes(self.received).upper().count(b"\r\n" + name.upper() + b"\r\n")

    async def close(self) -> None:
        assert self._server is not None
        for writer in self._writers:
            writer.close()
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def frozen() -> AsyncIterator[FrozenServer]:
    server = FrozenServer()
    await server.start()
    yield server
    await server.close()


OPERATIONS: dict[str, Callable[[RedisStore], Awaitable[object]]] = {
    "get": lambda s: s.get("k"),
    "get_many": lambda s: s.get_many(["k", "j"]),
    "set": lambda s: s.set("k", b"v", cas=0),
    "delete": lambda s: s.delete("k"),
    "incr": lambda s: s.incr("k", ttl=1),
    "incr-no-ttl": lambda s: s.incr("k"),
    "acquire_lease": lambda s: s.acquire_lease("l", "me", 1),
    "release_lease": lambda s: s.release_lease("l", "me"),
}


@pytest.mark.parametrize("first", ["get", "set", "incr", "get_many"])
@pytest.mark.parametrize("then", list(OPERATIONS))
async def test_a_timeout_opens_the_breaker_and_every_operation_then_fails_fast(
    frozen: FrozenServer, first: str, then: str
) -> None:
    store = RedisStore(f"redis://:pw@127.0.0.1:{frozen.port}/0", socket_timeout=0.1, probe_interval=30)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await OPERATIONS[first](store)
        assert time.monotonic() - started >= 0.09  # this one paid the timeout
        assert store.breaker.state is OPEN
        assert "breaker=open" in repr(store)
        seen, connections = len(frozen.received), frozen.connections
        started = time.monotonic()
        for _ in range(50):
            with pytest.raises(StoreUnavailable) as info:
                await OPERATIONS[then](store)
        assert time.monotonic() - started < 1.0  # 50 x 0.1 s without the breaker
        await asyncio.sleep(0.05)
        assert (len(frozen.received), frozen.connections) == (seen, connections)  # no round trip at all
        message = str(info.value)
        assert "circuit open" in message and f"127.0.0.1:{frozen.port}" in message and "pw" not in message
    finally:
        await store.close()


async def test_one_probe_pings_once_per_interval_while_open(frozen: FrozenServer) -> None:
    store = RedisStore(f"redis://127.0.0.1:{frozen.port}/0?probe_interval=0.15", socket_timeout=0.1)
    try:
        assert store.breaker.probe_interval == 0.15
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        # A connection that timed out is dropped, so each probe connects anew
        # (and times out in redis-py's connection handshake, before its PING).
        at_trip = frozen.connections
        for _ in range(40):  # busy callers do not add probes
            with pytest.raises(StoreUnavailable):
                await store.get("k")
            await asyncio.sleep(0.025)
        probes = frozen.connections - at_trip
        # 1 s of being open, one probe per 0.15 s interval + 0.1 s timeout: about 4
        assert 2 <= probes <= 6, probes
        assert frozen.commands(b"EVALSHA") + frozen.commands(b"EVAL") == 0  # no operation got through
        assert store.breaker.state in (OPEN, PROBING)
    finally:
        await store.close()
    assert store._probe_task is None  # close() stopped the probe


async def test_a_refused_connection_does_not_open_the_breaker() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", probe_interval=30)
    try:
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await store.get("k")
        assert store.breaker.closed  # cheap to try again, and a restarted server is used at once
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "interval"),
    [
        ("redis://127.0.0.1:{port}/0?probe_interval=0.25", 0.25),
        ("redis://127.0.0.1:{port}/0?socket_timeout=0.3&probe_interval=2", 2.0),
        ("redis://127.0.0.1:{port}/0?probe_interval=3&socket_timeout=0.3", 3.0),
        ("redis://127.0.0.1:{port}/0?socket_timeout=0.3", 1.0),
        ("redis://127.0.0.1:{port}/0", 1.0),
    ],
)
async def test_probe_interval_from_the_url_never_reaches_redis_py(redis_url: str, url: str, interval: float) -> None:
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    store = RedisStore(url.format(port=port), namespace=uuid.uuid4().hex)
    try:
        assert store.breaker.probe_interval == interval
        await store.ping()  # redis-py would refuse an option it does not know
        assert await store.set("k", b"v")
    finally:
        await store.close()


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_a_bad_probe_interval_in_the_url_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="probe_interval"):
        RedisStore(f"redis://127.0.0.1:1/0?probe_interval={value}")


# -- RedisStore against a real redis-server, frozen with SIGSTOP ----------------------------------


@pytest.fixture
def stoppable_redis() -> Iterator[tuple[int, str]]:
    """``(pid, url)`` of a private redis-server the test may SIGSTOP (resumed after, whatever happens)."""
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    proc, url = start_redis_server()
    try:
        yield proc.pid, url
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop_redis_server(proc)


async def test_frozen_redis_fails_fast_then_the_probe_closes_the_breaker_on_sigcont(
    stoppable_redis: tuple[int, str], caplog: pytest.LogCaptureFixture
) -> None:
    pid, url = stoppable_redis
    namespace = uuid.uuid4().hex
    store = RedisStore(url + "?probe_interval=0.1", namespace=namespace, socket_timeout=0.2)
    try:
        assert await store.set("k", b"before")
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await store.get("k")
            started = time.monotonic()
            for _ in range(30):
                with pytest.raises(StoreUnavailable):
                    await store.set("k", b"lost")
            assert time.monotonic() - started < 1.0  # 30 x 0.2 s without the breaker
            await asyncio.sleep(0.5)  # several probes time out meanwhile
            assert not store.breaker.closed
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(150):  # up to 3 s for a probe to find it
            if store.breaker.closed:
                break
            await asyncio.sleep(0.02)
        assert store.breaker.closed
        assert await store.set("k", b"after")
        assert await store.get("k") == (b"after", (await store.get("k"))[1])
        client = redis.Redis.from_url(url)
        try:  # the write reached Redis itself
            assert client.hget(f"{namespace}:v:k", "val") == b"after"
        finally:
            client.close()
        opened = [r for r in caplog.records if "failing fast" in r.getMessage()]
        closed = [r for r in caplog.records if "circuit closed" in r.getMessage()]
        assert (len(opened), len(closed)) == (1, 1)  # one warning each way, not one per operation
    finally:
        await store.close()


async def test_an_explicit_ping_closes_the_breaker(stoppable_redis: tuple[int, str]) -> None:
    pid, url = stoppable_redis
    store = RedisStore(url, namespace=uuid.uuid4().hex, socket_timeout=0.2, probe_interval=30)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await store.get("k")
        finally:
            os.kill(pid, signal.SIGCONT)
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await store.get("k")  # the next probe is 30 s away
        await store.ping()
        assert store.breaker.closed
        assert await store.get("k") == (None, 0)
    finally:
        await store.close()
