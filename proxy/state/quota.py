"""Quotas: reserve amounts on several counters at once, all or nothing, then settle them.

The store's one primitive for limits and budgets (:meth:`SharedStore.reserve`
and :meth:`SharedStore.settle`). A caller (the ``ratelimit`` filter) names
the counters a request is charged to, each a :class:`Quota`; one atomic step
checks them all and either reserves on every one or on none, and reports
each counter's state (:class:`QuotaState`). When the request has ended, one
more step replaces each reservation by the real amount (:class:`Settlement`).

Two kinds of counter, chosen by ``window``:

* **sliding log** (``window > 0``): every reservation is an entry (its id,
  its admission time, its amount). The counter's value is the sum of the
  entries admitted in the last ``window`` seconds, measured on the store's
  clock (the Redis server's ``TIME``; the process's monotonic clock for the
  memory store). Exact for *any* window of that length: nothing slides
  past the limit at a window boundary (a fixed window admits twice the
  limit across one), and unlike a token bucket (GCRA) it bounds "the amount
  admitted in any ``window`` seconds", which is what a per-minute limit
  promises. Settling changes an entry's amount in place; an entry settled to
  0 is removed (a concurrency slot given back). An entry nobody settles
  leaves the window by itself, so a crashed holder cannot leak it.
* **running total** (``window == 0``): one integer, no entries (budgets: the
  calendar period is part of the key, ``ttl`` makes it expire after the
  period). Settling adds ``amount - reserved``.

Admission rule, per counter: the grant is ``min(amount, limit - used)``; the
reservation is admitted when every grant is at least its ``minimum``
(``amount`` unless a flexible reservation asks for less). So admitted
reservations never take a counter past its limit; only a settlement larger
than its reservation can (by at most that difference).

Counter keys must be distinct within one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Quota", "QuotaBook", "QuotaState", "Reservation", "Settlement"]


@dataclass(frozen=True, slots=True)
class Quota:
    """One counter to check and charge (see the module docstring)."""

    #: The counter's key (no secrets: hash credentials first).
    key: str
    #: The most the counter may hold; a grant never takes it past this.
    limit: int
    #: Seconds of the sliding window; 0 for a running total.
    window: float
    #: What to reserve.
    amount: int
    #: Reserve as much of ``amount`` as fits, but at least this (None: all of ``amount``).
    minimum: int | None = None
    #: Running totals: seconds the counter lives after this write (None: forever).
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A counter as one :meth:`~llmproxy.SharedStore.reserve` call left it."""

    #: The counter's value after the call (the grant included when admitted).
    used: int
    limit: int
    #: What was reserved on it (0 when the reservation was refused).
    granted: int
    #: Sliding log: seconds until everything in it has left the window (0 when empty). Running total: 0.
    reset: float
    #: When refused: seconds until ``minimum`` would fit (``math.inf``: never, it is larger
    #: than the limit, or a running total); 0 when it fits now.
    retry_after: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer of :meth:`~llmproxy.SharedStore.reserve`: admitted or not, and every counter's state."""

    admitted: bool
    states: tuple[QuotaState, ...]


@dataclass(frozen=True, slots=True)
class Settlement:
    """Replace a reservation on one counter by the real amount."""

    key: str
    #: The counter's window, as reserved (0: running total).
    window: float
    #: What was granted at reservation (``QuotaState.granted``).
    reserved: int
    #: The real amount (0 releases it).
    amount: int


class _Log:
    """One sliding-log counter of :class:`QuotaBook`: entries in admission order, and their sum."""

    __slots__ = ("entries", "total", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.entries: dict[str, tuple[float, int]] = {}  # id -> (admitted at, amount); insertion = time order
        self.total = 0

    def prune(self, horizon: float) -> None:
        entries = self.entries
        while entries:
            rid = next(iter(entries))
            at, amount = entries[rid]
            if at > horizon:
                return
            del entries[rid]
            self.total -= amount


class QuotaBook:
    """The quota counters of :class:`~llmproxy.MemoryStore`: plain Python, one process, no I/O.

    The same algorithm as the Redis script (:data:`llmproxy.state.redis_scripts.LUA_RESERVE`).
    ``clock`` gives monotonic seconds.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._totals: dict[str, tuple[int, float | None]] = {}  # key -> (total, expires at)

    def __repr__(self) -> str:
        return f"<QuotaBook logs={len(self._logs)} totals={len(self._totals)}>"

    def _total(self, key: str, now: float) -> int:
        entry = self._totals.get(key)
        if entry is None:
            return 0
        if entry[1] is not None and entry[1] <= now:
            del self._totals[key]
            return 0
        return entry[0]

    def reserve(self, rid: str, quotas: Sequence[Quota]) -> Reservation:
        now = self._clock()
        used: list[int] = []
        grants: list[int] = []
        admitted = True
        for quota in quotas:
            if quota.window > 0:
                log = self._logs.get(quota.key)
                if log is None:
                    log = self._logs[quota.key] = _Log(quota.window)
                log.prune(now - quota.window)
                total = log.total
            else:
                total = self._total(quota.key, now)
            grant = min(quota.amount, quota.limit - total)
            if grant < (quota.amount if quota.minimum is None else quota.minimum):
                admitted = False
            used.append(total)
            grants.append(grant)
        states: list[QuotaState] = []
        for quota, total, grant in zip(quotas, used, grants, strict=True):
            granted = grant if admitted else 0
            if admitted:
                total += granted
                if quota.window > 0:
                    log = self._logs[quota.key]
                    log.entries[rid] = (now, granted)
                    log.total = total
                else:
                    if quota.ttl is not None:
                        expires: float | None = now + quota.ttl
                    else:  # keep the expiry it has (as Redis keeps a key's ttl)
                        current = self._totals.get(quota.key)
                        expires = current[1] if current is not None else None
                    self._totals[quota.key] = (total, expires)
            states.append(self._state(quota, total, granted, admitted, now))
        return Reservation(admitted, tuple(states))

    def _state(self, quota: Quota, total: int, granted: int, admitted: bool, now: float) -> QuotaState:
        if quota.window <= 0:
            retry = 0.0 if admitted or total + _need(quota) <= quota.limit else math.inf
            return QuotaState(total, quota.limit, granted, 0.0, retry)
        log = self._logs[quota.key]
        reset = 0.0
        if log.entries:
            newest = log.entries[next(reversed(log.entries))][0]
            reset = max(0.0, newest + quota.window - now)
        retry = 0.0
        need = _need(quota)
        if not admitted and total + need > quota.limit:
            retry = math.inf
            if need <= quota.limit:
                freed = 0
                for at, amount in log.entries.values():
                    freed += amount
                    if total - freed + need <= quota.limit:
                        retry = max(0.0, at + quota.window - now)
                        break
        return QuotaState(total, quota.limit, granted, reset, retry)

    def settle(self, rid: str, settlements: Sequence[Settlement]) -> None:
        now = self._clock()
        for s in settlements:
            if s.window > 0:
                log = self._logs.get(s.key)
                if log is None:
                    continue
                entry = log.entries.get(rid)
                if entry is None:
                    continue  # it has left the window already
                log.total += s.amount - entry[1]
                if s.amount == 0:
                    del log.entries[rid]
                    if not log.entries:
                        del self._logs[s.key]
                else:
                    log.entries[rid] = (entry[0], s.amount)
            else:
                current = self._totals.get(s.key)
                if current is None or (current[1] is not None and current[1] <= now):
                    continue  # the period is over
                self._totals[s.key] = (current[0] + s.amount - s.reserved, current[1])

    def sweep(self) -> None:
        """Drop entries that left their window, empty logs and expired totals (amortised by the store)."""
        now = self._clock()
        for key in [k for k, (_t, exp) in self._totals.items() if exp is not None and exp <= now]:
            del self._totals[key]
        for log in self._logs.values():
            log.prune(now - log.window)
        for key in [k for k, log in self._logs.items() if not log.entries]:
            del self._logs[key]

    def counters(self) -> int:
        return len(self._logs) + len(self._totals)


def _need(quota: Quota) -> int:
    return quota.amount if quota.minimum is None else quota.minimum
