"""Key health: the state machine and its shared record in the store.

Each (provider, key) has one record in the shared store, under
``failover:<provider>:<key id>`` (a hash of the key, never the key)::

    healthy --401/403--------------------------> ejected
    healthy --429 (retry-after or cooldown)----> cooling --time passes--> healthy
    healthy --failure_threshold x (5xx, connect, reset, timeout)--> ejected
    ejected --success_threshold x probe ok-----> healthy
    ejected --eject_for passes (no health checks)--> trial: one request may try it

Updates are compare-and-swap loops on the store, so concurrent workers and
instances never lose one another's updates. Every worker keeps a *view*
(its last known copy of each record): requests choose keys from the view
after refreshing the candidates' records, and when the store is
unreachable they keep serving from the view and apply their own updates to
it, then write through again once the store answers.

Times are wall-clock seconds (``time.time()``) because they are shared
between machines. The book reads them from its ``clock`` (``time.time``
unless given), so tests drive the state machine with a fake clock instead of
sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from llmproxy import SharedStore, StoreUnavailable

__all__ = ["HealthBook", "KeyHealth"]

log = logging.getLogger("llmproxy.failover")

HEALTHY = "healthy"
COOLING = "cooling"
EJECTED = "ejected"


@dataclass(frozen=True, slots=True)
class KeyHealth:
    """One key's shared record."""

    state: str = HEALTHY
    failures: int = 0
    #: cooling: when it ends; ejected: when it may be probed or tried next.
    until: float = 0.0
    probe_successes: int = 0
    reason: str = ""

    def usable(self, now: float, trial_after_ejection: bool) -> bool:
        if self.state == HEALTHY:
            return True
        if self.state == COOLING:
            return now >= self.until
        return trial_after_ejection and now >= self.until

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"s": self.state, "f": self.failures, "u": self.until, "p": self.probe_successes, "r": self.reason}
        )

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> KeyHealth:
        if not raw:
            return _HEALTHY
        try:
            d: dict[str, Any] = orjson.loads(raw)
            return cls(str(d["s"]), int(d["f"]), float(d["u"]), int(d.get("p", 0)), str(d.get("r", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return _HEALTHY


_HEALTHY = KeyHealth()


class HealthBook:
    """The worker's view of key health, kept in step with the shared store."""

    def __init__(
        self,
        store: SharedStore,
        *,
        failure_threshold: int,
        success_threshold: int,
        cooldown: float,
        eject_for: float,
        trial_after_ejection: bool,
        share_interval: float = 0.0,
        clock: Callable[[], float] = time.time,
        on_store_error: Callable[[], None] | None = None,
    ) -> None:
        """``on_store_error`` is called once per failed store call (the factory's counter)."""
        self.store = store
        self.on_store_error = on_store_error
        #: Wall-clock seconds now; every time the book compares or stores comes from it.
        self.clock = clock
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.cooldown = cooldown
        self.eject_for = eject_for
        self.trial_after_ejection = trial_after_ejection
        self.view: dict[str, KeyHealth] = {}
        #: Seconds a record read from the store is used before :meth:`refresh` reads it again.
        self.share_interval = share_interval
        #: Record key -> time.monotonic() until which its view is fresh enough.
        self._fresh_until: dict[str, float] = {}
        self.store_available = True
        self.store_errors = 0

    @staticmethod
    def record_key(provider: str, key_id: str) -> str:
        return f"failover:{provider}:{key_id}"

    def health(self, key: str) -> KeyHealth:
        return self.view.get(key, _HEALTHY)

    def usable(self, key: str, now: float | None = None) -> bool:
        return self.health(key).usable(self.clock() if now is None else now, self.trial_after_ejection)

    def _store_down(self, exc: StoreUnavailable) -> None:
        self.store_errors += 1
        if self.on_store_error is not None:
            self.on_store_error()
        if self.store_available:
            log.warning("shared store unreachable, serving from the last known key health: %s", exc)
        self.store_available = False

    def _store_up(self) -> None:
        if not self.store_available:
            log.warning("shared store reachable again; key health is shared again")
        self.store_available = True

    async def refresh(self, keys: list[str], *, force: bool = False) -> None:
        """Read the records of ``keys`` into the view (kept as is if the store is down).

        Only records read longer than ``share_interval`` ago are read (all of them with
        ``force``): on a shared store, admission costs a round trip at most once per interval,
        not per request. Another instance's finding is seen within that interval; this
        worker's own changes are in the view at once.
        """
        if self.share_interval > 0 and not force:
            now = time.monotonic()
            fresh = self._fresh_until
            keys = [k for k in keys if fresh.get(k, 0.0) <= now]
            if not keys:
                return
            until = now + self.share_interval
            for k in keys:  # before the await: concurrent requests do not read them again
                fresh[k] = until
        try:
            results = await self.store.get_many(keys)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        self._store_up()
        for key, (raw, _version) in zip(keys, results, strict=True):
            self.view[key] = KeyHealth.from_bytes(raw)

    async def _update(self, key: str, change: Callable[[KeyHealth], KeyHealth]) -> KeyHealth:
        """Apply ``change(old) -> new`` atomically (CAS loop); return the new record."""
        try:
            for _ in range(16):
                raw, version = await self.store.get(key)
                old = KeyHealth.from_bytes(raw)
                new = change(old)
                if new == old:
                    self.view[key] = old
                    self._store_up()
                    return old
                if await self.store.set(key, new.to_bytes(), cas=version):
                    self.view[key] = new
                    self._store_up()
                    _log_transition(key, old, new)
                    return new
            log.warning("key health %s: too much contention, update applied locally only", key)
        except StoreUnavailable as exc:
            self._store_down(exc)
        old = self.health(key)
        new = change(old)
        self.view[key] = new
        _log_transition(key, old, new)
        return new

    async def success(self, key: str) -> None:
        """A request on ``key`` succeeded: reset its failure count (no write when nothing changes)."""
        current = self.health(key)
        if current.state == HEALTHY and current.failures == 0:
            return
        await self._update(key, lambda old: _HEALTHY if old.state != EJECTED or self.trial_after_ejection else old)

    async def failure(self, key: str, kind: str, retry_after: float | None = None) -> KeyHealth:
        """Count a failure of ``kind`` (``auth``, ``quota``, ``rate``, ``server``) against ``key``."""
        now = self.clock()

        def change(old: KeyHealth) -> KeyHealth:
            if kind in ("auth", "quota"):  # quota: out of credit (OpenAI 429 insufficient_quota)
                return KeyHealth(EJECTED, old.failures + 1, now + self.eject_for, 0, kind)
            if kind == "rate":
                wait = retry_after if retry_after is not None else self.cooldown
                if old.state == EJECTED:
                    return old
                return KeyHealth(COOLING, old.failures, now + wait, 0, "rate_limited")
            failures = old.failures + 1
            if old.state == EJECTED or failures >= self.failure_threshold:
                return KeyHealth(EJECTED, failures, now + self.eject_for, 0, "failures")
            return replace(old, failures=failures)

        return await self._update(key, change)

    async def probe_result(self, key: str, ok: bool, interval: float) -> KeyHealth:
        """Record an active health-check result for an ejected key."""
        now = self.clock()

        def change(old: KeyHealth) -> KeyHealth:
            if old.state != EJECTED:
                return old
            if not ok:
                return replace(old, probe_successes=0, until=now + interval)
            successes = old.probe_successes + 1
            if successes >= self.success_threshold:
                return _HEALTHY
            return replace(old, probe_successes=successes, until=now + interval)

        return await self._update(key, change)

    async def forget(self, key: str) -> None:
        """Drop a record (a key that was removed from the config)."""
        try:
            await self.store.delete(key)
        except StoreUnavailable as exc:
            self._store_down(exc)
        self.view.pop(key, None)


def _log_transition(key: str, old: KeyHealth, new: KeyHealth) -> None:
    """Log a key's change of state by the update this worker made (``key`` names only the key id).

    Ejection is a WARNING, recovery an INFO; a 429's cooling and a counted
    failure are DEBUG (one line per decision, formatted only when enabled).
    """
    if new.state == old.state:
        if new.failures != old.failures and log.isEnabledFor(logging.DEBUG):
            log.debug("key %s: failure %d counted (%s), still %s", key, new.failures, new.reason or "-", new.state)
        return
    if new.state == EJECTED:
        log.warning(
            "key %s ejected (reason %s, %d failures); next try in %.0fs",
            key,
            new.reason or "-",
            new.failures,
            max(0.0, new.until - time.time()),
        )
    elif new.state == HEALTHY:
        log.info("key %s restored (was %s, reason %s)", key, old.state, old.reason or "-")
    elif new.state == COOLING and log.isEnabledFor(logging.INFO):
        log.info("key %s cooling for %.1fs (provider rate limit)", key, max(0.0, new.until - time.time()))
