"""Shared state for filters, in the style of proxy-wasm's shared data.

A :class:`SharedStore` is what filters use to share state across exchanges,
workers and (with a networked backend) instances: key health, counters,
budgets, leases. Its contract is the same for every backend, so a filter is
written once and tested against each:

* ``get`` returns ``(value, version)``; version 0 means absent. ``get_many``
  reads several keys at once, in one round trip where the backend has them. ``set`` with
  ``cas=version`` succeeds only if nobody wrote the key since that read
  (compare-and-swap, as proxy-wasm's ``set_shared_data(key, value, cas)``);
  ``cas=None`` writes unconditionally. ``cas=0`` means "only if absent".
* ``incr`` is an atomic add that creates the key at 0 first; ``ttl`` applies
  when the key is created, so a fixed window expires on its own.
* ``acquire_lease(name, holder, ttl)`` takes a lease that nobody else holds,
  or renews one ``holder`` already holds. A holder that stops renewing loses
  the lease after ``ttl`` and another may take it over.
* ``reserve(quotas)`` reserves amounts on several counters in one atomic
  step, on all of them or on none, and ``settle(settlements)`` replaces
  the reservation by the real amounts (limits and budgets; see
  :mod:`llmproxy.state.quota` for the sliding log and the admission rule).
  One round trip each on a networked backend. A store that answers them
  without I/O (``in_process``: the memory store) also has them as plain
  calls, :meth:`~SharedStore.reserve_now` and :meth:`~SharedStore.settle_now`,
  so a caller on the hot path pays no coroutine per request.

Keys are plain strings chosen by filters; backends namespace them. A key
must never contain a secret (hash credentials first).

:class:`MemoryStore` is the default: one process, no I/O. Its coroutines
never suspend (one coroutine call each), and its quota calls have plain
twins that cost none. Expired entries are
dropped when read and, so that keys nobody reads again do not pile up in a
long-running worker, by a sweep amortised over writes.
"""

from __future__ import annotations

import enum
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

from llmproxy.state.quota import Quota, QuotaBook, Reservation, Settlement

__all__ = ["BreakerState", "CircuitBreaker", "MemoryStore", "SharedStore", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The backend cannot be reached; callers should keep their last known view."""


class BreakerState(enum.Enum):
    """Where a :class:`CircuitBreaker` is; see its transition table."""

    #: Operations go to the backend.
    CLOSED = "closed"
    #: The backend is known down: operations fail fast until a probe answers.
    OPEN = "open"
    #: One probe is in flight; operations still fail fast.
    PROBING = "probing"


_CLOSED, _OPEN, _PROBING = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.PROBING

# (state, event) -> next state; a pair that is missing is a bug in the owner.
_BREAKER_TRANSITIONS: dict[tuple[BreakerState, str], BreakerState] = {
    (_CLOSED, "trip"): _OPEN,
    (_OPEN, "trip"): _OPEN,  # another operation in flight failed too
    (_PROBING, "trip"): _PROBING,
    (_OPEN, "begin_probe"): _PROBING,
    (_PROBING, "probe_failed"): _OPEN,
    (_PROBING, "probe_succeeded"): _CLOSED,
    (_CLOSED, "reset"): _CLOSED,
    (_OPEN, "reset"): _CLOSED,
    (_PROBING, "reset"): _CLOSED,
}


class CircuitBreaker:
    """Fail fast while a backend is known down, instead of paying its timeout per call.

    Pure policy, no I/O: the owner asks :attr:`closed` before each operation,
    calls :meth:`trip` when one failed in a way that cost a timeout, and runs
    a single probe when :meth:`wait` says one is due (``begin_probe``, then
    ``probe_failed`` or ``probe_succeeded``). Every transition is in one
    table; an event that is illegal in the current state raises
    ``RuntimeError``::

        closed  --trip------------> open      operations fail fast
        open    --begin_probe-----> probing   one probe in flight
        probing --probe_failed----> open      next probe ``probe_interval`` later
        probing --probe_succeeded-> closed
        any     --reset-----------> closed    an explicit check answered

    ``clock`` is injectable (monotonic seconds) so tests need not sleep.
    """

    __slots__ = ("_clock", "cause", "probe_at", "probe_interval", "state", "trips")

    def __init__(self, probe_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < probe_interval < math.inf:
            raise ValueError(f"probe_interval must be greater than 0, not {probe_interval!r}")
        self.probe_interval = probe_interval
        self._clock = clock
        self.state = _CLOSED
        #: What tripped it (kept until it closes again).
        self.cause = ""
        #: When the next probe is due (monotonic seconds), while open.
        self.probe_at = 0.0
        #: How many times it went from closed to open.
        self.trips = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state.value} trips={self.trips}>"

    def _move(self, event: str) -> BreakerState:
        try:
            self.state = _BREAKER_TRANSITIONS[self.state, event]
        except KeyError:
            raise RuntimeError(f"circuit breaker: {event} is not allowed while {self.state.value}") from None
        return self.state

    @property
    def closed(self) -> bool:
        """True when operations may go to the backend."""
        return self.state is _CLOSED

    def trip(self, cause: str) -> bool:
        """An operation failed at a cost; True when this opened the breaker (it was closed)."""
        was_closed = self.state is _CLOSED
        self._move("trip")
        if was_closed:
            self.cause = cause
            self.probe_at = self._clock() + self.probe_interval
            self.trips += 1
        return was_closed

    def wait(self) -> float:
        """Seconds until the next probe is due (0 when due now)."""
        return max(0.0, self.probe_at - self._clock())

    def begin_probe(self) -> None:
        """The owner starts its one probe (only while open)."""
        self._move("begin_probe")

    def probe_failed(self) -> None:
        """The probe got no answer: stay open, the next probe one interval from now."""
        self._move("probe_failed")
        self.probe_at = self._clock() + self.probe_interval

    def probe_succeeded(self) -> None:
        """The backend answered the probe: operations go to it again."""
        self._move("probe_succeeded")
        self.cause = ""

    def reset(self) -> None:
        """Close from any state (an explicit check outside the probe answered)."""
        self._move("reset")
        self.cause = ""


class SharedStore(ABC):
    """The shared-state interface every backend implements (see module docstring)."""

    #: True when :meth:`reserve_now` and :meth:`settle_now` work: the backend answers
    #: without I/O (one process's memory). Networked backends keep only the coroutines.
    in_process: ClassVar[bool] = False

    @abstractmethod
    async def get(self, key: str) -> tuple[bytes | None, int]:
        """Return ``(value, version)``; ``(None, 0)`` when the key is absent or expired."""

    async def get_many(self, keys: Sequence[str]) -> list[tuple[bytes | None, int]]:
        """``get`` of each of ``keys``, in order (backends override it with one round trip)."""
        return [await self.get(key) for key in keys]

    @abstractmethod
    async def set(self, key: str, value: bytes, *, cas: int | None = None, ttl: float | None = None) -> bool:
        """Write ``value``; return False (and write nothing) on a CAS mismatch."""

    @abstractmethod
    async def delete(self, key: str, *, cas: int | None = None) -> bool:
        """Remove ``key``; return False on a CAS mismatch or when it was absent."""

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Atomically add ``amount`` and return the new value; ``ttl`` applies on creation."""

    @abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``holder``; True while ``holder`` holds it."""

    @abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give up the lease if ``holder`` holds it."""

    async def reserve(self, quotas: Sequence[Quota]) -> Reservation:
        """Reserve on every counter of ``quotas`` if each grant reaches its minimum, else on none.

        One atomic step (see :mod:`llmproxy.state.quota`); each state's ``slot``
        and ``granted`` go into the :class:`Settlement` of that counter.
        """
        raise NotImplementedError(f"{type(self).__name__} has no quotas")

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Replace reservations by the real amounts (0 releases them); one atomic step."""
        raise NotImplementedError(f"{type(self).__name__} has no quotas")

    def reserve_now(self, quotas: Sequence[Quota]) -> Reservation:
        """:meth:`reserve` as a plain call; only where :attr:`in_process` is True."""
        raise NotImplementedError(f"{type(self).__name__} answers quotas over I/O only")

    def settle_now(self, settlements: Sequence[Settlement]) -> None:
        """:meth:`settle` as a plain call; only where :attr:`in_process` is True."""
        raise NotImplementedError(f"{type(self).__name__} answers quotas over I/O only")

    async def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release connections; the store is unusable afterwards."""


# Writes between two sweeps of expired entries, at least. Redis expires keys
# on access and with an active cycle that samples 20 keys with a ttl ten times
# a second; a whole-dict sweep once per as many writes as there are entries
# keeps the cost per write O(1) amortised and the dead entries below the
# number of live ones plus the writes since the last sweep.
_SWEEP_EVERY = 1024


class MemoryStore(SharedStore):
    """In-process store: a dict of ``key -> (value, version, expires_at)``.

    Versions come from one counter per store, so a version is never reused
    for a key even after it was deleted and written again. Expired values
    and counters are removed when read, and by a sweep once per
    ``max(_SWEEP_EVERY, entries left by the last sweep)`` writes (``set``,
    ``incr``, leases).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._data: dict[str, tuple[bytes, int, float | None]] = {}
        self._counters: dict[str, tuple[int, float | None]] = {}
        self._version = 0
        self._clock = clock
        self._writes = 0
        #: Writes until the next sweep: as many as there were entries after the last one.
        self._sweep_after = _SWEEP_EVERY
        self._quotas = QuotaBook(clock)

    def _wrote(self) -> None:
        """Count a write; sweep expired entries once enough writes paid for it."""
        self._writes += 1
        if self._writes < self._sweep_after:
            return
        now = self._clock()
        dead = [k for k, (_v, _ver, exp) in self._data.items() if exp is not None and exp <= now]
        for key in dead:
            del self._data[key]
        gone = [k for k, (_n, exp) in self._counters.items() if exp is not None and exp <= now]
        for key in gone:
            del self._counters[key]
        self._quotas.sweep()
        self._writes = 0
        self._sweep_after = max(_SWEEP_EVERY, len(self._data) + len(self._counters) + self._quotas.counters())

    def __repr__(self) -> str:
        return f"<MemoryStore keys={len(self._data)} counters={len(self._counters)}>"

    def _live(self, key: str) -> tuple[bytes, int, float | None] | None:
        entry = self._data.get(key)
        if entry is not None and entry[2] is not None and entry[2] <= self._clock():
            del self._data[key]
            return None
        return entry

    async def get(self, key: str) -> tuple[bytes | None, int]:
        entry = self._live(key)
        if entry is None:
            return None, 0
        return entry[0], entry[1]

    async def get_many(self, keys: Sequence[str]) -> list[tuple[bytes | None, int]]:
        out: list[tuple[bytes | None, int]] = []
        for key in keys:
            entry = self._live(key)
            out.append((None, 0) if entry is None else (entry[0], entry[1]))
        return out

    async def set(self, key: str, value: bytes, *, cas: int | None = None, ttl: float | None = None) -> bool:
        entry = self._live(key)
        if cas is not None and (entry[1] if entry else 0) != cas:
            return False
        self._version += 1
        expires = self._clock() + ttl if ttl is not None else None
        self._data[key] = (value, self._version, expires)
        self._wrote()
        return True

    async def delete(self, key: str, *, cas: int | None = None) -> bool:
        entry = self._live(key)
        if entry is None or (cas is not None and entry[1] != cas):
            return False
        del self._data[key]
        return True

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        now = self._clock()
        current = self._counters.get(key)
        if current is None or (current[1] is not None and current[1] <= now):
            current = (0, now + ttl if ttl is not None else None)
        value = current[0] + amount
        self._counters[key] = (value, current[1])
        self._wrote()
        return value

    in_process: ClassVar[bool] = True

    def reserve_now(self, quotas: Sequence[Quota]) -> Reservation:
        reservation = self._quotas.reserve(quotas)
        self._wrote()
        return reservation

    def settle_now(self, settlements: Sequence[Settlement]) -> None:
        self._quotas.settle(settlements)

    async def reserve(self, quotas: Sequence[Quota]) -> Reservation:
        return self.reserve_now(quotas)

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        self._quotas.settle(settlements)

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        key = "lease:" + name
        entry = self._live(key)
        if entry is not None and entry[0] != holder.encode():
            return False
        return await self.set(key, holder.encode(), ttl=ttl)

    async def release_lease(self, name: str, holder: str) -> None:
        key = "lease:" + name
        entry = self._live(key)
        if entry is not None and entry[0] == holder.encode():
            del self._data[key]
