"""The quota primitive (``SharedStore.reserve`` / ``settle``), run against every backend.

Same tests for MemoryStore and RedisStore on a real ``redis-server``: all or
nothing across counters, the sliding window on the store's clock, flexible
grants, settlement and release, retry-after, and atomicity under concurrency.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from llmproxy import Quota, Settlement, SharedStore
from llmproxy.state.redis import RedisStore
from llmproxy.state.store import MemoryStore

from ..redis_server import redis_url

__all__ = ["redis_url"]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SharedStore]:
    backend: SharedStore
    if request.param == "memory":
        backend = MemoryStore()
    else:
        backend = RedisStore(request.getfixturevalue("redis_url"), namespace=f"test-{uuid.uuid4().hex}")
    yield backend
    await backend.close()


async def test_reserves_within_the_limit_and_refuses_past_it(store: SharedStore) -> None:
    q = Quota("tpm", limit=100, window=60, amount=40)
    first = await store.reserve([q])
    second = await store.reserve([q])
    third = await store.reserve([q])
    assert first.admitted and second.admitted and not third.admitted
    assert (first.states[0].used, second.states[0].used, third.states[0].used) == (40, 80, 80)
    assert third.states[0].granted == 0 and third.states[0].remaining == 20
    assert 59 < third.states[0].retry_after <= 61  # when the first bucket leaves the window
    assert 59 < third.states[0].reset <= 61


async def test_all_or_nothing_across_counters(store: SharedStore) -> None:
    big = Quota("a", limit=1000, window=60, amount=10)
    small = Quota("b", limit=15, window=60, amount=10)
    assert (await store.reserve([big, small])).admitted
    refused = await store.reserve([big, small])
    assert not refused.admitted
    assert refused.states[0].used == 10  # nothing was charged to the counter that had room
    assert (await store.reserve([big])).states[0].used == 20


async def test_the_window_slides(store: SharedStore) -> None:
    q = Quota("rpm", limit=2, window=0.3, amount=1)
    assert (await store.reserve([q])).admitted
    await asyncio.sleep(0.15)
    assert (await store.reserve([q])).admitted
    assert not (await store.reserve([q])).admitted
    await asyncio.sleep(0.2)  # the first entry left the window, the second did not
    assert (await store.reserve([q])).admitted
    assert not (await store.reserve([q])).admitted


async def test_settle_replaces_the_reservation(store: SharedStore) -> None:
    q = Quota("tpm", limit=100, window=60, amount=90)
    first = await store.reserve([q])
    assert first.admitted
    assert not (await store.reserve([Quota("tpm", 100, 60, 20)])).admitted
    await store.settle([Settlement("tpm", 60, first.states[0].slot, 90, 30)])
    after = await store.reserve([Quota("tpm", 100, 60, 20)])
    assert after.admitted and after.states[0].used == 50


async def test_settle_to_zero_releases(store: SharedStore) -> None:
    q = Quota("conc", limit=1, window=600, amount=1)
    first = await store.reserve([q])
    assert first.admitted
    assert not (await store.reserve([q])).admitted
    await store.settle([Settlement("conc", 600, first.states[0].slot, 1, 0)])
    assert (await store.reserve([q])).admitted


async def test_running_totals_and_flexible_grants(store: SharedStore) -> None:
    q = Quota("budget:day", limit=200, window=0, amount=150, minimum=10, ttl=60)
    first = await store.reserve([q])
    assert first.admitted and first.states[0].granted == 150
    second = await store.reserve([q])
    assert second.admitted and second.states[0].granted == 50  # as much as fits
    third = await store.reserve([q])
    assert not third.admitted and third.states[0].retry_after == math.inf
    await store.settle([Settlement("budget:day", 0, 0, 150, 100)])
    fourth = await store.reserve([q])
    assert fourth.admitted and fourth.states[0].granted == 50 and fourth.states[0].used == 200


async def test_a_request_larger_than_the_limit_never_fits(store: SharedStore) -> None:
    state = (await store.reserve([Quota("x", limit=10, window=60, amount=11)])).states[0]
    assert state.retry_after == math.inf and state.granted == 0


async def test_concurrent_reservations_never_pass_the_limit(store: SharedStore) -> None:
    q = Quota("race", limit=10, window=60, amount=1)
    results = await asyncio.gather(*(store.reserve([q]) for _ in range(100)))
    assert sum(r.admitted for r in results) == 10


async def test_settling_an_unknown_reservation_is_a_no_op(store: SharedStore) -> None:
    await store.settle([Settlement("nothing", 60, 12345, 5, 3), Settlement("nothing-total", 0, 0, 5, 3)])
    state = (await store.reserve([Quota("nothing-total", 10, 0, 1)])).states[0]
    assert state.used == 1


async def test_the_memory_store_sweeps_quota_entries() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    for i in range(3000):
        await store.reserve([Quota(f"k{i}", 5, 1.0, 1)])
        now[0] += 0.01
    assert store._quotas.counters() < 1500  # swept: only the last second's are kept (plus a sweep's worth)


async def test_a_busy_counter_keeps_one_entry_per_bucket() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    for _ in range(10_000):
        assert (await store.reserve([Quota("busy", 1 << 40, 60, 1)])).admitted
        now[0] += 0.05  # 500 s of traffic at 20 requests a second
    log = store._quotas._logs["busy"]
    assert len(log.buckets) <= 61 and log.total == sum(log.buckets.values())
    assert 1180 <= log.total <= 1221  # the last 60 s (and at most one bucket more)


async def test_an_amount_counts_for_at_least_the_whole_window(store: SharedStore) -> None:
    q = Quota("edge", limit=1, window=0.6, amount=1)
    assert (await store.reserve([q])).admitted
    started = time.monotonic()
    while not (await store.reserve([q])).admitted:  # noqa: ASYNC110 - polling the store is the point
        await asyncio.sleep(0.01)
    assert 0.6 <= time.monotonic() - started + 0.02 <= 0.8  # back after the window (+ at most one bucket)
