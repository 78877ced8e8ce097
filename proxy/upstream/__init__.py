"""The upstream client: h11 connections in a pool per origin.

This module is the one boundary where socket, TLS and h11 exceptions are
mapped into the project's own :class:`~llmproxy.errors.UpstreamError` types;
nothing above it ever sees an ``OSError``, ``ssl.SSLError`` or h11 error.

Timeouts (each a typed :class:`~llmproxy.errors.UpstreamTimeout` with its
``phase``):

* ``connect``: TCP connect plus TLS handshake, and waiting for a free pool slot;
* ``headers``: from sending the request (its body included, when the
  upstream reads it slowly) to the response head (a non-streaming completion
  only answers once generated, so this is generous by default);
* ``idle``: between two body chunks (a stalled stream is cut, not hung);
* ``total``: the whole attempt, body included.

Pool policy (:class:`OriginPool`): idle connections are reused newest
first; a connection idle longer than ``keepalive_expiry``, closed by the
peer, or whose last exchange saw an error or did not finish its body is
never reused; at most ``max_per_origin`` connections per origin exist, and
callers beyond that wait in line: a released connection or a freed slot goes
to the oldest waiter, and a new caller takes nothing while older ones wait.

Response heads are strict: a head whose framing could be read two ways
(both Content-Length and Transfer-Encoding, differing lengths, a coding other
than a single ``chunked``, an invalid length), a status outside 100-599, or a
head over ``max_head_bytes`` or ``max_head_fields`` (whatever the read
boundaries) is an :class:`~llmproxy.errors.UpstreamProtocolError`, and the
connection is closed. Bytes an upstream sends while no request is
outstanding close the connection too: they could only be a response planted
for the next request.

Flow control: each connection pauses reading from its socket while more
than ``READ_HIGH_WATER`` bytes of body wait to be consumed, so a slow client
throttles the upstream instead of making the proxy buffer without bound; a
request body is sent respecting the transport's ``pause_writing``.

Layout: this module holds the public API (targets, :class:`UpstreamPool`,
:class:`UpstreamResponse`); the pool policy is :mod:`llmproxy.upstream.pool`, one
connection :mod:`llmproxy.upstream.connection`, one response's parsing state
:mod:`llmproxy.upstream.reader`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import h11

from llmproxy.engine.secrets import credential_values
from llmproxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from llmproxy.upstream.connection import READ_HIGH_WATER, ConnState, UpstreamConnection
from llmproxy.upstream.pool import Grant, OriginPool
from llmproxy.upstream.reader import MAX_CONTENT_LENGTH, MAX_RESPONSE_FIELDS, MAX_RESPONSE_HEAD

if TYPE_CHECKING:
    from llmproxy.signing import RequestSigner, StreamDecoderFactory

#: Re-exported under their former names (tests drive the pool policy with them).
_ConnState = ConnState
_Grant = Grant
_OriginPool = OriginPool
_UpstreamConnection = UpstreamConnection

__all__ = [
    "MAX_CONTENT_LENGTH",
    "MAX_RESPONSE_FIELDS",
    "MAX_RESPONSE_HEAD",
    "READ_HIGH_WATER",
    "Timeouts",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTarget",
]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds (see the module docstring for each phase)."""

    connect: float = 5.0
    headers: float = 300.0
    idle: float = 60.0
    total: float = 900.0


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where an attempt goes: origin, path prefix, extra headers, timeouts and TLS.

    ``headers`` are added to the upstream request after the client's
    credentials were removed: provider credentials go here.
    """

    name: str
    scheme: str
    host: str
    port: int
    base_path: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    verify: bool = True
    ca_file: str | None = None
    host_header: bytes = b""
    #: A short, non-reversible id of the credential in ``headers`` (logs, metrics,
    #: :class:`~llmproxy.attempt.Attempt`); "" when the target carries none.
    key_id: str = ""
    #: The credential values in ``headers`` (``Bearer`` stripped), longest first: what must
    #: never reach a client (see :mod:`llmproxy.engine.secrets`). Derived; not compared.
    secrets: tuple[bytes, ...] = field(default=(), repr=False, compare=False)
    #: Signs each attempt's final request (SigV4 and the like; :mod:`llmproxy.signing`).
    signer: RequestSigner | None = field(default=None, repr=False, compare=False)
    #: Decodes a non-SSE streaming body into SSE events (:mod:`llmproxy.signing`).
    stream_decoder: StreamDecoderFactory | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.headers and not self.secrets:
            object.__setattr__(self, "secrets", credential_values(self.headers))

    @classmethod
    def from_url(cls, name: str, url: str, **kwargs: Any) -> UpstreamTarget:
        """Build a target from ``http(s)://host[:port][/base/path]``; raises ValueError."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http:// or https:// with a host: {url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host_header = parts.hostname if port == default_port else f"{parts.hostname}:{port}"
        if ":" in parts.hostname and port == default_port:
            host_header = f"[{parts.hostname}]"
        return cls(
            name=name,
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            base_path=parts.path.rstrip("/"),
            host_header=host_header.encode("ascii"),
            **kwargs,
        )

    @property
    def pool_key(self) -> tuple[str, str, int, bool, str | None]:
        """Connections are shared between targets with equal keys."""
        return (self.scheme, self.host, self.port, self.verify, self.ca_file)

    def __repr__(self) -> str:
        # headers may hold credentials: never show them
        return f"<UpstreamTarget {self.name} {self.scheme}://{self.host}:{self.port}{self.base_path}>"


class UpstreamResponse:
    """A response being received. Read the body with :meth:`read`; always
    finish with :meth:`release` (connection back to the pool when the body was
    read to the end) or :meth:`close` (connection discarded)."""

    __slots__ = ("_conn", "_deadline", "_done", "_idle", "_pool", "headers", "http_version", "status")

    def __init__(
        self, pool: OriginPool, conn: UpstreamConnection, head: h11.Response, idle: float, deadline: float
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._idle = idle
        self._deadline = deadline
        self._done = False
        self.status: int = head.status_code
        self.headers: list[tuple[bytes, bytes]] = conn.reader.head_fields
        self.http_version = head.http_version

    def read(self) -> Coroutine[Any, Any, bytes]:
        """The next body chunk; b"" at the end. Raises UpstreamError subclasses.

        A plain method returning the connection's coroutine: one frame less
        on every resumption of a waiting read.
        """
        return self._conn.read_chunk(self._idle, self._deadline)

    @property
    def content_length(self) -> int | None:
        """The length of this body as the connection counts it off the socket, or None.

        None when the body is chunked or delimited by the close. The length is
        the validated Content-Length that frames the bytes :meth:`read` returns
        (an upstream sending more is cut there and its connection closed), so a
        client told it gets exactly that many bytes. For a response that has no
        body by its request method (HEAD) it is the declared length, which
        frames nothing; for a 204 or 304 it is None.
        """
        return self._conn.reader.body_length

    def stall_timeout(self) -> float:
        """Seconds a reader may wait now: the idle timeout, within what is left of the total deadline.

        For waits on the other side of the relay (a client that does not read)
        that must not hold this response's connection longer than the upstream could.
        """
        return min(self._idle, self._deadline - self._conn._loop.time())

    @property
    def at_end(self) -> bool:
        """The body is complete: every byte of it was returned by :meth:`read` (the end is known)."""
        return self._conn.at_end

    @property
    def buffered(self) -> bool:
        """A next chunk (or the end) is already here: :meth:`read` returns without waiting."""
        return self._conn.has_data

    def release(self) -> None:
        """Return the connection to the pool if reusable, else close it. Idempotent."""
        if self._done:
            return
        self._done = True
        self._pool.release(self._conn)

    def close(self) -> None:
        """Discard the connection (unfinished body, error, client gone). Idempotent."""
        if self._done:
            return
        self._done = True
        self._conn.abort()
        self._pool.release(self._conn)


class UpstreamPool:
    """Pools of upstream connections keyed by origin (and TLS settings).

    ``max_head_bytes`` and ``max_head_fields`` bound every response head (see
    :data:`MAX_RESPONSE_HEAD` and :data:`MAX_RESPONSE_FIELDS`); a head past
    either is an :class:`UpstreamProtocolError` and its connection is closed.
    """

    def __init__(
        self,
        max_per_origin: int = 256,
        keepalive_expiry: float = 30.0,
        *,
        max_head_bytes: int = MAX_RESPONSE_HEAD,
        max_head_fields: int = MAX_RESPONSE_FIELDS,
    ) -> None:
        self.max_per_origin = max_per_origin
        self.keepalive_expiry = keepalive_expiry
        self.max_head_bytes = max_head_bytes
        self.max_head_fields = max_head_fields
        self._pools: dict[tuple[str, str, int, bool, str | None], OriginPool] = {}
        self._ssl_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop its connections live on

    def __repr__(self) -> str:
        return f"<UpstreamPool {list(self._pools.values())}>"

    def _ssl_context(self, verify: bool, ca_file: str | None) -> ssl.SSLContext:
        key = (verify, ca_file)
        ctx = self._ssl_contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=ca_file)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl_contexts[key] = ctx
        return ctx

    def _origin(self, target: UpstreamTarget) -> OriginPool:
        key = target.pool_key
        pool = self._pools.get(key)
        if pool is None:
            ctx = self._ssl_context(target.verify, target.ca_file) if target.scheme == "https" else None
            pool = OriginPool(key, self.max_per_origin, self.keepalive_expiry, ctx)
            self._pools[key] = pool
        return pool

    async def _connect(self, pool: OriginPool, target: UpstreamTarget, deadline: float) -> UpstreamConnection:
        """Connect in a slot reserved for the caller; the slot is freed (and passed on) on failure."""
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(pool, self.max_head_bytes, self.max_head_fields)
        pool.start_connection(conn)
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(
                    lambda: conn,
                    target.host,
                    target.port,
                    ssl=pool.ssl_context,
                    server_hostname=target.host if pool.ssl_context is not None else None,
                )
        except TimeoutError:
            conn.abort()
            pool.release(conn)
            raise UpstreamTimeout(f"connecting to upstream '{target.name}' timed out", phase="connect") from None
        except ssl.SSLError as exc:
            conn.abort()
            pool.release(conn)
            raise UpstreamConnectError(
                f"TLS handshake with upstream '{target.name}' failed: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            conn.abort()
            pool.release(conn)
            reason = exc.strerror or type(exc).__name__
            raise UpstreamConnectError(f"cannot connect to upstream '{target.name}': {reason}") from None
        except BaseException:
            conn.abort()
            pool.release(conn)
            raise
        return conn

    async def _acquire(self, target: UpstreamTarget, deadline: float) -> tuple[OriginPool, UpstreamConnection]:
        """A connection for one exchange, in arrival order (see :class:`OriginPool`)."""
        pool = self._origin(target)
        grant = pool.acquire(time.monotonic())
        if grant is None:
            waiter = pool.queue(asyncio.get_running_loop())
            try:
                async with asyncio.timeout_at(deadline):
                    grant = await waiter
            except TimeoutError:
                pool.withdraw(waiter)
                raise UpstreamTimeout(
                    f"no free connection to upstream '{target.name}' in time", phase="connect"
                ) from None
            except BaseException:
                pool.withdraw(waiter)
                raise
        if grant is Grant.SLOT:
            return pool, await self._connect(pool, target, deadline)
        return pool, grant

    async def send(
        self,
        target: UpstreamTarget,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> UpstreamResponse:
        """Send one request and wait for the response head.

        A request that fails on a reused keep-alive connection before any
        response byte (the peer closed it while idle) is sent once more on a
        fresh connection, as it never reached the upstream's application; the
        fresh connection takes the dead one's slot, so the caller keeps its
        turn.
        """
        loop = self._loop
        if loop is None:
            # cached: asyncio.get_running_loop() costs a getpid() system call each time
            loop = self._loop = asyncio.get_running_loop()
        timeouts = target.timeouts
        now = loop.time()
        total_deadline = now + timeouts.total
        connect_deadline = min(now + timeouts.connect, total_deadline)
        pool, conn = await self._acquire(target, connect_deadline)
        for attempt in range(2):
            try:
                head_deadline = min(loop.time() + timeouts.headers, total_deadline)
                await conn.send_request(method, path, headers, body, head_deadline)
                head = await conn.read_head(head_deadline)
            except UpstreamError as exc:
                conn.abort()
                if attempt == 0 and conn.reused and isinstance(exc, UpstreamConnectError):
                    pool.active.discard(conn)
                    pool.reserved += 1  # its slot, kept for the fresh connection
                    conn = await self._connect(pool, target, connect_deadline)
                    continue
                pool.release(conn)
                raise
            except BaseException:
                conn.abort()
                pool.release(conn)
                raise
            return UpstreamResponse(pool, conn, head, timeouts.idle, total_deadline)
        raise UpstreamConnectError(f"upstream '{target.name}' closed the connection")  # pragma: no cover

    def expire_idle(self) -> None:
        """Close idle connections past their keep-alive expiry (called periodically)."""
        now = time.monotonic()
        for pool in self._pools.values():
            pool.expire_idle(now)

    async def close(self) -> None:
        """Close every connection."""
        for pool in self._pools.values():
            for conn in pool.idle + list(pool.active):
                conn.abort()
            pool.idle.clear()
        self._pools.clear()
