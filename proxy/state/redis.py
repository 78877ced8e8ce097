"""A :class:`~llmproxy.state.store.SharedStore` on Redis, shared by every proxy instance.

Theory of operation
-------------------
Every operation is one round trip and atomic on the server: either a single
native command (``INCRBY``) or a small Lua script (sent once with
``SCRIPT LOAD``, then run with ``EVALSHA``; redis-py reloads it on
``NOSCRIPT``). No script touches more than one key, ``KEYS[1]``, so the store
works unchanged on Redis Cluster and no read-modify-write ever happens on the
client side.

Key layout (``ns`` is the ``namespace`` argument, ``key`` the filter's key)::

    <ns>:v:<key>   hash {val, ver, exp}   get / set / delete, and leases
    <ns>:n:<key>   integer string         incr
    <ns>:{q}:<key> hash {t, o, n, <bucket>...}   reserve / settle: a quota's total, and a
                                                  sliding log's time buckets and their amounts

``reserve`` and ``settle`` are the exception to "one key per script": they
check and charge several quotas in one atomic step. Their keys share the
hash tag ``{q}``, so on Redis Cluster they all live in one slot (one node
carries every quota; the rest of the store spreads as before).

Values and counters are separate key spaces, as in
:class:`~llmproxy.state.store.MemoryStore` (``incr("k")`` never touches ``get("k")``),
and a Redis key holds a single type, hence the one-letter kind tag. Apart
from ``reserve``/``settle`` no script needs a second key, so no other Redis
Cluster hash tag is needed. A lease
``name`` lives at the value key ``lease:<name>`` (again as in
``MemoryStore``), so ``get("lease:<name>")`` returns the holder and a version
that works as a fencing token.

Versions
--------
A value hash keeps ``ver``, the last version issued for the key, and the next
write takes ``max(ver + 1, server TIME in microseconds)``. Deleting a key, or
letting its ``ttl`` run out, does not remove the hash: ``val`` and ``exp`` go
(or ``exp`` passes) and the hash stays as a *tombstone* that keeps ``ver``
for ``tombstone_ttl`` seconds, after which Redis reclaims it. So:

* while the hash (live value or tombstone) exists, versions are strictly
  increasing whatever the clocks do;
* after the tombstone is gone, the next version comes from the server clock,
  which has moved past every version issued before unless it stepped
  backwards (a version never runs ahead of the clock by more than the number
  of writes in one microsecond, and a script takes longer than that).

A version can therefore be reused only if a client keeps a stale version for
longer than ``tombstone_ttl`` *and* the server clock stepped back across it.
Versions are integers below 2**53 (exact in Lua's doubles) and are kept as
decimal strings, so CAS compares strings and never rounds.

Expiry of values is logical: ``exp`` (server milliseconds) is checked by
each script, and the hash's own ``PEXPIRE`` is ``ttl + tombstone_ttl``.
Float seconds become whole milliseconds, rounded up, at least 1.

Errors
------
Connection failures, timeouts, a loading or read-only (failed-over) server
and a full pool become :class:`~llmproxy.state.store.StoreUnavailable` in one place,
:func:`_guarded`; messages name the URL with its password replaced by
``***``. redis-py's own retries are off: an ambiguous failure (command sent,
reply lost) must not apply a CAS write or an ``incr`` twice. Idle
connections the server closed are replaced when taken from the pool, so the
store recovers by itself once Redis is back.

Circuit breaker
---------------
A Redis that accepts connections but does not answer (frozen, ``DEBUG
SLEEP``, a black-holed route) would make every operation wait its
``socket_timeout``: at 0.5 s per request, 320 req/s become 16. So a failure
that cost a timeout (reply, connect, or waiting for a pooled connection)
opens a :class:`~llmproxy.state.store.CircuitBreaker`: from then on every operation
raises :class:`~llmproxy.state.store.StoreUnavailable` at once, with no round trip,
and callers serve from their last view. One background task sends a
``PING`` (bounded by the same timeouts) every ``probe_interval`` seconds and
closes the breaker when Redis answers; an explicit :meth:`RedisStore.ping`
closes it too. A refused or reset connection does not open it: that failure
is as cheap as failing fast, and the next operation then reaches a restarted
server at once. Opening and closing are logged once each (logger
``llmproxy.store``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from llmproxy.state.quota import BUCKETS, Quota, QuotaState, Reservation, Settlement
from llmproxy.state.redis_scripts import (
    LUA_ACQUIRE,
    LUA_DELETE,
    LUA_GET,
    LUA_INCR_TTL,
    LUA_PRELUDE,
    LUA_RELEASE,
    LUA_RESERVE,
    LUA_SET,
    LUA_SETTLE,
)
from llmproxy.state.store import BreakerState, CircuitBreaker, SharedStore, StoreUnavailable

__all__ = ["RedisStore"]

log = logging.getLogger("llmproxy.store")

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Failures that mean "the store cannot serve now", as opposed to bugs
# (WRONGTYPE, script errors, ACL denials), which propagate unchanged.
# ConnectionError covers AuthenticationError, BusyLoadingError and the pool's
# MaxConnectionsError / "No connection available."; ReadOnlyError is a write
# sent to a demoted primary after a failover.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.OutOfMemoryError,
    OSError,  # includes the builtin TimeoutError (asyncio's, on 3.11)
)

#: Query options of the store URL that are the store's, not redis-py's.
_STORE_OPTIONS = frozenset({"probe_interval"})


def _costly(exc: BaseException) -> bool:
    """True for a failure that made the caller wait a timeout: reply, connect or pool.

    redis-py raises its ``TimeoutError`` for reply and connect timeouts, and a
    ``ConnectionError("No connection available.")`` caused by asyncio's
    ``TimeoutError`` when waiting for a pooled connection ran out.
    """
    return isinstance(exc, (rex.TimeoutError, TimeoutError)) or isinstance(exc.__cause__, TimeoutError)


def _store_options(url: str) -> tuple[str, dict[str, str]]:
    """Split the store's own query options (:data:`_STORE_OPTIONS`) off ``url``.

    redis-py passes unknown query options on to its connections, which
    refuse them, so they must not reach it.
    """
    head, sep, query = url.partition("?")
    if not sep:
        return url, {}
    pairs = parse_qsl(query, keep_blank_values=True)
    ours = {name: value for name, value in pairs if name in _STORE_OPTIONS}
    if not ours:
        return url, {}
    rest = [(name, value) for name, value in pairs if name not in _STORE_OPTIONS]
    return (head + "?" + urlencode(rest) if rest else head), ours


def _millis(seconds: float) -> int:
    """Whole milliseconds for a ttl in seconds: rounded up, at least 1 (PX 0 is invalid)."""
    return max(1, math.ceil(seconds * 1000))


#: Milliseconds a sliding-log quota's keys outlive their window (then Redis reclaims them).
_QUOTA_SLACK_MS = 5000


def _micros(seconds: float) -> int:
    """Whole microseconds of a quota window (0 stays 0: a running total)."""
    return max(1, round(seconds * 1_000_000)) if seconds > 0 else 0


def _redact(url: str) -> tuple[str, list[str]]:
    """Return ``url`` with any password replaced by ``***``, and the secrets removed.

    Handles ``redis://user:pw@host`` and the ``?password=pw`` query option.
    The secrets are returned in raw and unquoted form, so messages can be
    scrubbed of them too.
    """
    parts = urlsplit(url)
    secrets: list[str] = []
    netloc = parts.netloc
    if parts.password:
        secrets += [parts.password, unquote(parts.password)]
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostport}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        secrets += [value for name, value in query if name == "password" and value]
        query = [(name, "***" if name == "password" else value) for name, value in query]
    safe = f"{parts.scheme}://{netloc}{parts.path}"  # urlunsplit drops unix:// 's empty netloc
    if query:
        safe += "?" + urlencode(query, safe="*", quote_via=quote)
    return safe, [s for s in secrets if s]


def _boundary(
    method: Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]], *, fail_fast: bool
) -> Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]]:
    """Turn the redis-py failures in :data:`_UNAVAILABLE` into :class:`StoreUnavailable`.

    The one boundary between redis-py and the rest of the proxy. The message
    names the operation, the redacted URL and the cause, scrubbed of the
    password. A failure that cost a timeout trips the circuit breaker; with
    ``fail_fast``, the operation raises at once while the breaker is open.
    """

    @functools.wraps(method)
    async def wrapper(self: RedisStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if fail_fast and not self.breaker.closed:
            raise StoreUnavailable(self._open_message)
        try:
            return await method(self, *args, **kwargs)
        except _UNAVAILABLE as exc:
            message = self._describe(method.__name__, exc)
            if _costly(exc):
                self._trip(message)
            raise StoreUnavailable(message) from exc

    return wrapper


def _unavailable_on_error(
    method: Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]]:
    """:func:`_boundary` for operations that always go to the server (``ping``, ``close``)."""
    return _boundary(method, fail_fast=False)


def _guarded(
    method: Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]]:
    """:func:`_boundary` that fails fast, with no round trip, while the breaker is open."""
    return _boundary(method, fail_fast=True)


class RedisStore(SharedStore):
    """Shared store on one Redis (or Redis Cluster-compatible) server.

    ``url`` is a redis-py URL (``redis://``, ``rediss://``, ``unix://``).
    ``socket_timeout`` bounds each reply, ``connect_timeout`` each connect,
    and waiting for one of the ``max_connections`` pooled connections is
    bounded by ``socket_timeout`` too; past these the operation raises
    :class:`StoreUnavailable`. ``tombstone_ttl`` is how long a deleted or
    expired key keeps its last version (see the module docstring).

    ``probe_interval`` is how often the open circuit breaker pings the
    server (see the module docstring); the URL query option
    ``?probe_interval=<seconds>`` sets it too (and wins), so a config's
    ``store:`` URL can tune it. :attr:`breaker` shows its state.

    Construction does no I/O; call :meth:`ping` to check the server at startup.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "llmproxy",
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        max_connections: int = 64,
        tombstone_ttl: float = 600.0,
        probe_interval: float = 1.0,
    ) -> None:
        url, options = _store_options(url)
        self._url, self._secrets = _redact(url)
        self._prefix = namespace + ":"
        self._tomb_ms = _millis(tombstone_ttl)
        if "probe_interval" in options:
            try:
                probe_interval = float(options["probe_interval"])
            except ValueError:
                raise ValueError("redis store URL: probe_interval must be a number of seconds") from None
        #: Open while the server is known down (see the module docstring).
        self.breaker = CircuitBreaker(probe_interval)
        self._open_message = ""
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = Redis.from_pool(pool)
        self._get = self._redis.register_script(LUA_PRELUDE + LUA_GET)
        self._set = self._redis.register_script(LUA_PRELUDE + LUA_SET)
        self._delete = self._redis.register_script(LUA_PRELUDE + LUA_DELETE)
        self._acquire = self._redis.register_script(LUA_PRELUDE + LUA_ACQUIRE)
        self._release = self._redis.register_script(LUA_PRELUDE + LUA_RELEASE)
        self._incr_ttl = self._redis.register_script(LUA_INCR_TTL)
        self._reserve = self._redis.register_script(LUA_RESERVE)
        self._settle = self._redis.register_script(LUA_SETTLE)

    def __repr__(self) -> str:
        return f"<RedisStore {self._url} namespace={self._prefix[:-1]!r} breaker={self.breaker.state.value}>"

    def _trip(self, message: str) -> None:
        """A costly failure: open the breaker (once) and start the one probe task."""
        if not self.breaker.trip(message):
            return
        interval = self.breaker.probe_interval
        self._open_message = f"{message} (circuit open: failing fast, probing every {interval:g}s)"
        log.warning("redis store %s unavailable, failing fast until it answers a probe: %s", self._url, message)
        if not self._closed and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop(), name="redis-store-probe")

    async def _probe_loop(self) -> None:
        """Ping every ``probe_interval`` while the breaker is open; close it on an answer."""
        breaker = self.breaker
        while not breaker.closed:
            await asyncio.sleep(breaker.wait())
            if breaker.closed:  # an explicit ping() closed it meanwhile
                return
            breaker.begin_probe()
            try:
                await self._redis.ping()
            except Exception as exc:  # any failure, a bug included, keeps it open: never die probing
                if breaker.state is BreakerState.PROBING:  # not closed by ping() meanwhile
                    breaker.probe_failed()
                if not isinstance(exc, _UNAVAILABLE):
                    log.warning("redis store %s probe failed: %s", self._url, self._describe("probe", exc))
                continue
            if breaker.state is BreakerState.PROBING:
                breaker.probe_succeeded()
                log.warning("redis store %s answers again; circuit closed", self._url)

    def _describe(self, operation: str, exc: BaseException) -> str:
        """A secret-free message for ``exc`` raised during ``operation``."""
        cause = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            cause = cause.replace(secret, "***")
        return f"redis store {self._url} unavailable during {operation}: {cause}"

    def _value_key(self, key: str) -> str:
        return f"{self._prefix}v:{key}"

    @_unavailable_on_error
    async def ping(self) -> None:
        """Check that the server answers; raise :class:`StoreUnavailable` if not.

        Always asks the server, even while the breaker is open, and closes it
        on an answer.
        """
        await self._redis.ping()
        if not self.breaker.closed:
            self.breaker.reset()
            log.warning("redis store %s answers again; circuit closed", self._url)

    @_guarded
    async def get(self, key: str) -> tuple[bytes | None, int]:
        found = await self._get(keys=[self._value_key(key)])
        if found is None:
            return None, 0
        value, version = found
        return bytes(value), int(version)

    @_guarded
    async def get_many(self, keys: Sequence[str]) -> list[tuple[bytes | None, int]]:
        """One round trip: a pipeline of the server's clock and one ``HMGET`` per key.

        Read-only and single-key per command, so no script and no hash tag are
        needed; expiry is judged against the server's clock, as the scripts do.
        """
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        for key in keys:
            pipe.hmget(self._value_key(key), "val", "ver", "exp")
        replies = await pipe.execute()
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        out: list[tuple[bytes | None, int]] = []
        for value, version, expires in replies[1:]:
            if value is None or (expires is not None and int(expires) <= now_ms):
                out.append((None, 0))
            else:
                out.append((bytes(value), int(version)))
        return out

    @_guarded
    async def set(self, key: str, value: bytes, *, cas: int | None = None, ttl: float | None = None) -> bool:
        args: list[bytes | str] = [
            value,
            "" if cas is None else str(cas),
            "" if ttl is None else str(_millis(ttl)),
            str(self._tomb_ms),
        ]
        return bool(await self._set(keys=[self._value_key(key)], args=args))

    @_guarded
    async def delete(self, key: str, *, cas: int | None = None) -> bool:
        args = ["" if cas is None else str(cas), str(self._tomb_ms)]
        return bool(await self._delete(keys=[self._value_key(key)], args=args))

    @_guarded
    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        counter = f"{self._prefix}n:{key}"
        if ttl is None:
            return int(await self._redis.incrby(counter, amount))
        return int(await self._incr_ttl(keys=[counter], args=[amount, _millis(ttl)]))

    @_guarded
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        args = [holder, str(_millis(ttl)), str(self._tomb_ms)]
        return bool(await self._acquire(keys=[self._value_key("lease:" + name)], args=args))

    @_guarded
    async def release_lease(self, name: str, holder: str) -> None:
        args = [holder, str(self._tomb_ms)]
        await self._release(keys=[self._value_key("lease:" + name)], args=args)

    def _quota_key(self, key: str) -> str:
        return f"{self._prefix}{{q}}:{key}"

    @_guarded
    async def reserve(self, quotas: Sequence[Quota]) -> Reservation:
        keys: list[str] = []
        args: list[str | int] = [_QUOTA_SLACK_MS, BUCKETS]
        for q in quotas:
            keys.append(self._quota_key(q.key))
            ttl = "" if q.ttl is None else _millis(q.ttl)
            args += [q.limit, _micros(q.window), q.amount, q.need, ttl]
        reply = await self._reserve(keys=keys, args=args)
        states = []
        for i, q in enumerate(quotas):
            used, granted, reset_us, retry_us, slot = (int(v) for v in reply[5 * i : 5 * i + 5])
            retry = math.inf if retry_us < 0 else retry_us / 1e6
            states.append(QuotaState(used, q.limit, granted, reset_us / 1e6, retry, slot))
        return Reservation(bool(int(reply[-1])), tuple(states))

    @_guarded
    async def settle(self, settlements: Sequence[Settlement]) -> None:
        keys: list[str] = []
        args: list[str | int] = []
        for s in settlements:
            keys.append(self._quota_key(s.key))
            args += [_micros(s.window), s.slot, s.amount - s.reserved]
        if keys:
            await self._settle(keys=keys, args=args)

    @_unavailable_on_error
    async def close(self) -> None:
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()
