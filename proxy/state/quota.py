"""Quotas: reserve amounts on several counters at once, all or nothing, then settle them.

The store's one primitive for limits and budgets (:meth:`SharedStore.reserve`
and :meth:`SharedStore.settle`). A caller (the ``ratelimit`` filter) names
the counters a request is charged to, each a :class:`Quota`; one atomic step
checks them all and either reserves on every one or on none, and reports
each counter's state (:class:`QuotaState`). When the request has ended, one
more step replaces each reservation by the real amount (:class:`Settlement`).

Two kinds of counter, chosen by ``window``:

* **sliding log** (``window > 0``): a log of what was admitted when, on the
  store's clock (the Redis server's ``TIME``; the process's monotonic clock
  for the memory store), kept in :data:`BUCKETS` time buckets of
  ``window / BUCKETS`` seconds each (so a counter costs at most
  ``BUCKETS + 1`` entries whatever the request rate). The counter's value is
  the sum of the buckets that are still in the window, and a bucket leaves
  the window only when its *end* is ``window`` seconds old: an amount is
  counted for at least ``window`` seconds (and at most one bucket longer).
  So the amount admitted in *any* ``window`` seconds never exceeds the
  limit: nothing slides past it at a window boundary (a fixed window admits
  twice the limit across one), and unlike a token bucket (GCRA) it bounds
  "the amount admitted in any window", which is what a per-minute limit
  promises. The price of buckets: room comes back up to one bucket
  (1/60 of the window) late. A reservation nobody settles leaves the window
  by itself, so a crashed holder cannot leak it.
* **running total** (``window == 0``): one integer (budgets: the calendar
  period is part of the key, ``ttl`` makes it expire after the period).

Settling adds ``amount - reserved`` to the bucket the reservation went to
(its ``slot``, from :attr:`QuotaState.slot`), or to the running total;
nothing when that bucket (or the total) has expired meanwhile.

Admission rule, per counter: the grant is ``min(amount, limit - used)``; the
reservation is admitted when every grant is at least its ``minimum``
(``amount`` unless a flexible reservation asks for less). So admitted
reservations never take a counter past its limit; only a settlement larger
than its reservation can (by that difference).

Counter keys must be distinct within one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

__all__ = ["BUCKETS", "Quota", "QuotaBook", "QuotaState", "Reservation", "Settlement"]

#: Time buckets per sliding window (the window's resolution).
BUCKETS = 60


class Quota(NamedTuple):
    """One counter to check and charge (see the module docstring). Immutable, like every value
    type here (tuples: they are built per request, and a tuple is the cheapest value there is)."""

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
    #: Running totals: seconds the counter lives after this write (None: keep its expiry).
    ttl: float | None = None

    @property
    def need(self) -> int:
        """The least grant that admits."""
        return self.amount if self.minimum is None else self.minimum


class QuotaState(NamedTuple):
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
    #: Where the grant went (the bucket), for :class:`Settlement`.
    slot: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


class Reservation(NamedTuple):
    """The answer of :meth:`~llmproxy.SharedStore.reserve`: admitted or not, and every counter's state."""

    admitted: bool
    states: tuple[QuotaState, ...]


class Settlement(NamedTuple):
    """Replace a reservation on one counter by the real amount."""

    key: str
    #: The counter's window, as reserved (0: running total).
    window: float
    #: Its :attr:`QuotaState.slot`.
    slot: int
    #: What was granted at reservation (:attr:`QuotaState.granted`).
    reserved: int
    #: The real amount (0 releases it).
    amount: int


#: A :class:`QuotaState` from a 6-tuple, without the Python-level ``__new__`` of a named tuple
#: (the admission path makes one per counter per request).
_state = partial(tuple.__new__, QuotaState)


def bucket_width(window: float) -> float:
    """Seconds per bucket of a sliding window."""
    return window / BUCKETS


class _Log:
    """One sliding-log counter of :class:`QuotaBook`: bucket -> amount (in time order), and their sum."""

    __slots__ = ("buckets", "next_drop", "total", "width", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.width = bucket_width(window)
        self.buckets: dict[int, int] = {}
        self.total = 0
        #: When the oldest bucket leaves the window (inf while empty): no pruning before.
        self.next_drop = math.inf

    def prune(self, now: float) -> None:
        """Drop the buckets whose end is ``window`` seconds old."""
        if now < self.next_drop:
            return
        buckets = self.buckets
        first_live = math.floor((now - self.window) / self.width)  # (b + 1) * width > now - window
        while buckets:
            oldest = next(iter(buckets))
            if oldest >= first_live:
                self.next_drop = (oldest + 1) * self.width + self.window
                return
            self.total -= buckets.pop(oldest)
        self.next_drop = math.inf

    def add(self, slot: int, amount: int) -> None:
        """Put ``amount`` in bucket ``slot`` (the newest)."""
        buckets = self.buckets
        if not buckets:
            self.next_drop = (slot + 1) * self.width + self.window
        buckets[slot] = buckets.get(slot, 0) + amount
        self.total += amount

    def leaves_at(self, bucket: int, now: float) -> float:
        """Seconds from ``now`` until ``bucket`` has left the window."""
        return max(0.0, (bucket + 1) * self.width + self.window - now)


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

    def reserve(self, quotas: Sequence[Quota]) -> Reservation:
        now = self._clock()
        logs = self._logs
        found: list[tuple[_Log | None, int]] = []
        admitted = True
        for key, limit, window, amount, minimum, _ttl in quotas:
            log: _Log | None = None
            if window > 0:
                log = logs.get(key)
                if log is None or log.window != window:
                    log = logs[key] = _Log(window)
                if now >= log.next_drop:
                    log.prune(now)
                total = log.total
            else:
                total = self._total(key, now)
            room = limit - total
            if (amount if amount < room else room) < (amount if minimum is None else minimum):
                admitted = False
            found.append((log, total))
        if not admitted:
            return self._refused(quotas, found, now)
        states: list[QuotaState] = []
        for (key, limit, window, amount, _minimum, ttl), (log, total) in zip(quotas, found, strict=True):
            room = limit - total
            granted = amount if amount < room else room
            total += granted
            if log is not None:
                width = log.width
                slot = math.floor(now / width)
                buckets = log.buckets
                if not buckets:
                    log.next_drop = (slot + 1) * width + window
                buckets[slot] = buckets.get(slot, 0) + granted
                log.total = total
                # the newest bucket is this one: everything has left when it has
                reset = (slot + 1) * width + window - now
                states.append(_state((total, limit, granted, reset if reset > 0 else 0.0, 0.0, slot)))
                continue
            if ttl is not None:
                expires: float | None = now + ttl
            else:  # keep the expiry it has (as Redis keeps a key's ttl)
                current = self._totals.get(key)
                expires = current[1] if current is not None else None
            self._totals[key] = (total, expires)
            states.append(_state((total, limit, granted, 0.0, 0.0, 0)))
        return Reservation(True, tuple(states))

    def _refused(self, quotas: Sequence[Quota], found: list[tuple[_Log | None, int]], now: float) -> Reservation:
        """The states of a refused reservation: nothing granted, when each would fit."""
        states: list[QuotaState] = []
        for quota, (log, total) in zip(quotas, found, strict=True):
            if log is not None:
                slot = math.floor(now / log.width)
                states.append(self._log_state(quota, log, total, 0, False, now, slot))
                continue
            retry = 0.0 if total + quota.need <= quota.limit else math.inf
            states.append(QuotaState(total, quota.limit, 0, 0.0, retry))
        return Reservation(False, tuple(states))

    @staticmethod
    def _log_state(
        quota: Quota, log: _Log, total: int, granted: int, admitted: bool, now: float, slot: int
    ) -> QuotaState:
        reset = log.leaves_at(next(reversed(log.buckets)), now) if log.buckets else 0.0
        retry = 0.0
        need = quota.need
        if not admitted and total + need > quota.limit:
            retry = math.inf
            if need <= quota.limit:
                freed = 0
                for bucket, amount in log.buckets.items():
                    freed += amount
                    if total - freed + need <= quota.limit:
                        retry = log.leaves_at(bucket, now)
                        break
        return QuotaState(total, quota.limit, granted, reset, retry, slot)

    def settle(self, settlements: Sequence[Settlement]) -> None:
        now = self._clock()
        for s in settlements:
            delta = s.amount - s.reserved
            if s.window > 0:
                log = self._logs.get(s.key)
                if log is None:
                    continue
                if now >= log.next_drop:
                    log.prune(now)
                buckets = log.buckets
                if s.slot not in buckets:
                    continue  # it has left the window already
                buckets[s.slot] += delta
                log.total += delta
            else:
                current = self._totals.get(s.key)
                if current is None or (current[1] is not None and current[1] <= now):
                    continue  # the period is over
                self._totals[s.key] = (current[0] + delta, current[1])

    def sweep(self) -> None:
        """Drop buckets that left their window, empty logs and expired totals (amortised by the store)."""
        now = self._clock()
        for key in [k for k, (_t, exp) in self._totals.items() if exp is not None and exp <= now]:
            del self._totals[key]
        for log in self._logs.values():
            log.prune(now)
        for key in [k for k, log in self._logs.items() if not log.buckets]:
            del self._logs[key]

    def counters(self) -> int:
        return len(self._logs) + len(self._totals)
