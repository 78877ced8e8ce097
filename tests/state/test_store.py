"""The SharedStore contract, run against every backend (MemoryStore and RedisStore).

Each contract test takes the parametrized ``store`` fixture; RedisStore runs on
a real ``redis-server`` (see :mod:`tests.redis_server`), one key namespace per
test. Redis-only behaviour (unreachable server, restart) is at the bottom.
Time-based tests use ttls of at most 0.3 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from llmproxy.state.redis import RedisStore
from llmproxy.state.store import MemoryStore, SharedStore, StoreUnavailable

from ..redis_server import free_port, redis_url, start_redis_server, stop_redis_server

__all__ = ["redis_url"]  # re-exported so pytest sees the fixture in this module


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SharedStore]:
    backend: SharedStore
    if request.param == "memory":
        backend = MemoryStore()
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisStore(url, namespace=f"test-{uuid.uuid4().hex}")
    yield backend
    await backend.close()


async def test_get_absent(store: SharedStore) -> None:
    assert await store.get("nope") == (None, 0)


async def test_set_then_get(store: SharedStore) -> None:
    value = b"\x00binary\xff\r\n"
    assert await store.set("k", value)
    got, version = await store.get("k")
    assert got == value
    assert version > 0
    assert await store.set("k", b"two")
    got, version2 = await store.get("k")
    assert (got, version2 != version) == (b"two", True)


async def test_cas_success_and_mismatch(store: SharedStore) -> None:
    await store.set("k", b"a")
    _, version = await store.get("k")
    assert await store.set("k", b"b", cas=version)
    assert not await store.set("k", b"c", cas=version)  # stale version
    assert (await store.get("k"))[0] == b"b"
    assert not await store.set("k", b"d", cas=version + 12345)


async def test_cas_zero_means_only_if_absent(store: SharedStore) -> None:
    assert await store.set("k", b"first", cas=0)
    assert not await store.set("k", b"second", cas=0)
    assert (await store.get("k"))[0] == b"first"
    assert not await store.set("other", b"x", cas=1)  # absent key has version 0


async def test_delete_with_cas(store: SharedStore) -> None:
    assert not await store.delete("k")  # absent
    await store.set("k", b"a")
    _, version = await store.get("k")
    assert not await store.delete("k", cas=version + 1)
    assert (await store.get("k"))[0] == b"a"
    assert await store.delete("k", cas=version)
    assert await store.get("k") == (None, 0)
    assert not await store.delete("k", cas=version)
    await store.set("k", b"b")
    assert await store.delete("k")  # unconditional


async def test_versions_never_reused_after_delete_or_expiry(store: SharedStore) -> None:
    seen: set[int] = set()
    for round_ in range(5):
        await store.set("k", b"v%d" % round_)
        _, version = await store.get("k")
        assert version not in seen
        seen.add(version)
        assert await store.delete("k")
        # A CAS with any old version must fail once the key was re-created.
        await store.set("k", b"again", cas=0)
        _, version = await store.get("k")
        assert version not in seen
        seen.add(version)
        for old in seen - {version}:
            assert not await store.set("k", b"stale", cas=old)
        await store.delete("k")
    await store.set("t", b"short", ttl=0.05)
    _, expiring = await store.get("t")
    await asyncio.sleep(0.1)
    assert await store.get("t") == (None, 0)
    assert await store.set("t", b"new", cas=0)
    assert (await store.get("t"))[1] != expiring


async def test_ttl_expiry_on_set(store: SharedStore) -> None:
    await store.set("short", b"x", ttl=0.1)
    await store.set("cleared", b"x", ttl=0.1)
    await store.set("cleared", b"y")  # a write without ttl makes the key persistent
    assert (await store.get("short"))[0] == b"x"
    await asyncio.sleep(0.2)
    assert await store.get("short") == (None, 0)
    assert not await store.delete("short")
    assert (await store.get("cleared"))[0] == b"y"


async def test_incr_is_atomic_under_concurrency(store: SharedStore) -> None:
    results = await asyncio.gather(*(store.incr("n") for _ in range(200)))
    assert sorted(results) == list(range(1, 201))
    assert await store.incr("n", 0) == 200
    assert await store.incr("n", -50) == 150


async def test_incr_counters_do_not_touch_values(store: SharedStore) -> None:
    assert await store.incr("k", 5) == 5
    assert await store.get("k") == (None, 0)
    await store.set("k", b"value")
    assert await store.incr("k") == 6


async def test_incr_ttl_applies_on_creation_only(store: SharedStore) -> None:
    assert await store.incr("w", ttl=0.15) == 1
    await asyncio.sleep(0.05)
    assert await store.incr("w", ttl=10) == 2  # does not extend the window
    await asyncio.sleep(0.15)
    assert await store.incr("w", ttl=10) == 1  # window expired: created again


async def test_lease_lifecycle(store: SharedStore) -> None:
    TTL = 1.0  # margins of 0.4 s: a loaded CI machine stalls a few hundred ms
    assert await store.acquire_lease("leader", "a", ttl=TTL)
    assert await store.acquire_lease("leader", "a", ttl=TTL)  # renew
    assert not await store.acquire_lease("leader", "b", ttl=TTL)
    await store.release_lease("leader", "b")  # not b's: no effect
    assert not await store.acquire_lease("leader", "b", ttl=TTL)
    await asyncio.sleep(0.6 * TTL)
    assert await store.acquire_lease("leader", "a", ttl=TTL)  # renewal extends
    await asyncio.sleep(0.6 * TTL)
    assert not await store.acquire_lease("leader", "b", ttl=TTL)
    await asyncio.sleep(0.6 * TTL)  # a stopped renewing: b takes over
    assert await store.acquire_lease("leader", "b", ttl=TTL)
    assert not await store.acquire_lease("leader", "a", ttl=TTL)
    await store.release_lease("leader", "b")
    assert await store.acquire_lease("leader", "a", ttl=TTL)


async def test_concurrent_cas_increments_lose_no_update(store: SharedStore) -> None:
    tasks, per_task = 10, 10

    async def bump() -> int:
        retries = 0
        for _ in range(per_task):
            while True:
                value, version = await store.get("count")
                await asyncio.sleep(0)  # let the others interleave, even in memory
                current = int(value) if value is not None else 0
                if await store.set("count", b"%d" % (current + 1), cas=version):
                    break
                retries += 1
        return retries

    retries = await asyncio.gather(*(bump() for _ in range(tasks)))
    assert (await store.get("count"))[0] == b"%d" % (tasks * per_task)
    assert sum(retries) > 0  # the test did exercise contention


# --- Redis only ---------------------------------------------------------------


async def test_namespaces_are_separate(redis_url: str) -> None:
    one, two = RedisStore(redis_url, namespace="ns-one"), RedisStore(redis_url, namespace="ns-two")
    try:
        await one.set("shared-name", b"one")
        assert await two.get("shared-name") == (None, 0)
    finally:
        await one.close()
        await two.close()


@pytest.mark.parametrize("operation", ["ping", "get", "get_many", "set", "incr"])
async def test_unreachable_redis_raises_store_unavailable_quickly(operation: str) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    store = RedisStore(url)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "ping": store.ping,
        "get": lambda: store.get("k"),
        "get_many": lambda: store.get_many(["k", "j"]),
        "set": lambda: store.set("k", b"v", cas=0),
        "incr": lambda: store.incr("k", ttl=1),
    }
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await calls[operation]()
    assert time.monotonic() - started < 2
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert all("s3cret" not in str(e) for e in chain)
    assert "127.0.0.1" in str(info.value)
    assert "s3cret" not in repr(store)
    await store.close()


async def test_store_works_again_after_redis_restarts() -> None:
    try:
        proc, url = start_redis_server()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    store = RedisStore(url, namespace="restart")
    try:
        await store.ping()
        assert await store.set("k", b"before")
        stop_redis_server(proc)
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        proc, _ = start_redis_server(port)
        # No persistence: the data is gone, but the store reconnects by itself.
        assert await store.get("k") == (None, 0)
        assert await store.set("k", b"after", cas=0)
        assert (await store.get("k"))[0] == b"after"
    finally:
        await store.close()
        stop_redis_server(proc)


async def test_get_many_matches_get_for_live_absent_deleted_and_expired_keys(store: SharedStore) -> None:
    await store.set("live", b"a")
    await store.set("deleted", b"b")
    await store.delete("deleted")
    await store.set("expiring", b"c", ttl=0.1)
    await store.set("lasting", b"d", ttl=60)
    await asyncio.sleep(0.25)
    keys = ["live", "absent", "deleted", "expiring", "lasting"]
    many = await store.get_many(keys)
    assert many == [await store.get(k) for k in keys]
    assert [value for value, _ in many] == [b"a", None, None, None, b"d"]
    assert many[0][1] > 0 and many[4][1] > 0
    assert await store.get_many([]) == []


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sizes(store: MemoryStore) -> tuple[int, int]:
    """``(keys, counters)`` as the store's repr reports them."""
    parts = dict(part.split("=") for part in repr(store).strip("<>").split()[1:])
    return int(parts["keys"]), int(parts["counters"])


@pytest.mark.parametrize(
    "write",
    [
        lambda s, i: s.set(f"value-{i}", b"x", ttl=1),
        lambda s, i: s.incr(f"window-{i}", ttl=1),
        lambda s, i: s.acquire_lease(f"lease-{i}", "me", 1),
    ],
    ids=["set", "incr", "lease"],
)
async def test_memory_store_sweeps_expired_entries_nobody_reads_again(
    write: Callable[[MemoryStore, int], Awaitable[object]],
) -> None:
    clock = _Clock()
    store = MemoryStore(clock)
    for round_ in range(20):  # a long-running worker: fresh keys every second, never read again
        for i in range(500):
            await write(store, round_ * 500 + i)
        clock.now += 2
    keys, counters = _sizes(store)
    # without a sweep: 10,000; with it, at most the live keys plus one sweep's worth of writes
    assert keys + counters <= 2048 + 500, (keys, counters)
    await store.set("lasting", b"kept")
    await store.incr("forever")
    for i in range(3000):  # enough writes for a sweep; the entries without a ttl survive it
        await store.set(f"late-{i}", b"x", ttl=1)
        clock.now += 0.001
    clock.now += 5
    for i in range(3000):
        await store.incr(f"later-{i}", ttl=1)
    assert (await store.get("lasting"))[0] == b"kept"
    assert await store.incr("forever") == 2
    assert sum(_sizes(store)) <= 2 + 3000 + 2048


async def test_memory_store_sweep_keeps_live_entries_and_versions() -> None:
    clock = _Clock()
    store = MemoryStore(clock)
    await store.set("live", b"a", ttl=100)
    _, version = await store.get("live")
    for i in range(5000):
        await store.set(f"short-{i}", b"x", ttl=0.5)
        clock.now += 0.01
    assert await store.get("live") == (b"a", version)
    assert await store.set("live", b"b", cas=version)
    keys, _ = _sizes(store)
    assert keys < 5000 // 2
