"""LazyTimer: one loop handle serving a moving deadline."""

from __future__ import annotations

import asyncio

from llmproxy.io.timers import LazyTimer


async def test_fires_once_at_the_latest_armed_deadline() -> None:
    loop = asyncio.get_running_loop()
    timer = LazyTimer(loop)
    fired: list[float] = []
    start = loop.time()
    timer.arm(start + 0.05, lambda: fired.append(loop.time()))
    timer.arm(start + 0.15, lambda: fired.append(loop.time()))  # moved later: the first handle re-arms
    await asyncio.sleep(0.1)
    assert fired == []
    await asyncio.sleep(0.15)
    assert len(fired) == 1 and fired[0] >= start + 0.149


async def test_an_earlier_deadline_fires_early_and_disarm_stops_it() -> None:
    loop = asyncio.get_running_loop()
    timer = LazyTimer(loop)
    fired: list[str] = []
    timer.arm(loop.time() + 5, lambda: fired.append("late"))
    timer.arm(loop.time() + 0.03, lambda: fired.append("early"))
    await asyncio.sleep(0.08)
    assert fired == ["early"]
    timer.arm(loop.time() + 0.03, lambda: fired.append("disarmed"))
    timer.disarm()
    await asyncio.sleep(0.08)
    assert fired == ["early"]
    timer.close()
