"""Assembling and running a proxy from a :class:`~llmproxy.runtime.config.Config`.

Lifecycle of one worker (:class:`Proxy`)::

    start():    store -> mock upstreams -> filter factories (start) -> listen
    serve:      until SIGTERM/SIGINT
    shutdown(): stop accepting -> close idle connections -> let in-flight
                exchanges (streams included) finish for ``shutdown_grace``
                seconds -> abort the rest -> close factories, pool, store, mocks

With ``server.workers > 1``, :func:`run` pre-forks that many worker
processes that all listen on the same port (``SO_REUSEPORT``); the parent
forwards signals and waits. Mock upstreams then run in one extra process
so every worker talks to the same mock. The default ``memory`` store is
per process; use ``store: redis://...`` for state every worker shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import uvloop

from llmproxy.context import FactoryContext
from llmproxy.engine.cycle import Runtime
from llmproxy.filter import FilterFactory
from llmproxy.http.server import HttpConnection
from llmproxy.runtime import logs, multiproc
from llmproxy.runtime.accesslog import AccessLog
from llmproxy.runtime.admin import AdminPages
from llmproxy.runtime.config import Config, ConfigError, MockSpec
from llmproxy.runtime.plugins import build_chain
from llmproxy.state.store import MemoryStore, SharedStore
from llmproxy.upstream import UpstreamPool
from llmproxy.upstream.client import UpstreamClient

__all__ = ["Proxy", "check_config", "is_loopback", "make_store", "open_relay_warning", "run"]

log = logging.getLogger("llmproxy")

#: Seconds cancelled exchanges get at shutdown to finish their end hooks.
_END_HOOKS_GRACE = 5.0


async def make_store(url: str, file: str = "<config>") -> SharedStore:
    """The shared store named by ``store:`` in the config; Redis is pinged at startup."""
    if url == "memory":
        return MemoryStore()
    try:
        from llmproxy.state.redis import RedisStore
    except ImportError as exc:  # pragma: no cover - redis is an optional extra
        raise ConfigError(
            file, "store", f"redis support is not installed ({exc}); pip install 'llmproxy[redis]'"
        ) from None
    from llmproxy.state.store import StoreUnavailable

    try:
        store = RedisStore(url)
    except ValueError as exc:  # a malformed URL or option (probe_interval=...)
        raise ConfigError(file, "store", str(exc)) from None
    try:
        await store.ping()
    except StoreUnavailable as exc:
        await store.close()
        raise ConfigError(file, "store", str(exc)) from None
    return store


def is_loopback(host: str) -> bool:
    """True when ``host`` (a listen address) is reachable only from this machine.

    ``localhost`` and loopback IP literals (127.0.0.0/8, ::1) are; the
    wildcard addresses (``0.0.0.0``, ``::``, "") and any other name are not
    (a name is not resolved: it could point anywhere).
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_relay_warning(host: str, port: int, factories: Sequence[FilterFactory]) -> str | None:
    """The warning for a proxy that anyone who reaches ``host:port`` may use, or None.

    None when ``host`` is a loopback address or a factory of the chain
    authenticates callers (:attr:`FilterFactory.authenticates`).
    """
    if is_loopback(host) or any(factory.authenticates for factory in factories):
        return None
    where = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
    return (
        f"open relay: no auth filter; anyone who can reach {where} spends your provider keys "
        "(add the auth filter: see 'Virtual keys' in the README)"
    )


class Proxy:
    """One worker: the listening server and everything its exchanges share."""

    def __init__(
        self, config: Config, *, worker_id: int = 0, mock_ports: dict[str, tuple[str, int]] | None = None
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.runtime: Runtime | None = None
        self.store: SharedStore | None = None
        self.context: FactoryContext | None = None
        self.mocks: list[Any] = []
        self.mock_ports: dict[str, tuple[str, int]] = dict(mock_ports or {})
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str | None = None, port: int | None = None, *, reuse_port: bool = False) -> None:
        """Build everything and start listening; raises ConfigError on bad config."""
        cfg = self.config
        logs.set_worker(self.worker_id)  # every log line of this process names its worker
        self.store = await make_store(cfg.store, cfg.file)
        if not self.mock_ports:
            await self._start_mocks(cfg.mock_upstreams)
        admin = AdminPages(cfg.server.admin_allow)
        pool = UpstreamPool(
            cfg.pool.max_per_origin,
            cfg.pool.keepalive_expiry,
            max_head_bytes=cfg.limits.max_upstream_header_bytes,
            max_head_fields=cfg.limits.max_upstream_header_count,
        )
        self.context = FactoryContext(
            self.store,
            self.worker_id,
            self.mock_ports,
            admin,
            UpstreamClient(pool),
            config_file=cfg.file,
            workers=cfg.server.workers,
        )
        chain = build_chain(cfg.filters, self.context, cfg.file)
        default_upstream = cfg.upstream.target("default", self.mock_ports) if cfg.upstream else None
        self.runtime = Runtime(
            chain=chain,
            pool=pool,
            limits=cfg.limits,
            default_upstream=default_upstream,
            validate_json=cfg.server.validate_json,
            overhead_header=cfg.server.overhead_header,
            access_log=AccessLog(json_lines=cfg.server.access_log == "json", enabled=cfg.server.access_log != "off"),
            admin=admin,
        )
        for factory in chain.factories:
            await factory.start()
        _freeze_startup_heap()  # after the filters' start(): price books and tokenizer tables too
        loop = asyncio.get_running_loop()
        rt = self.runtime
        self._server = await loop.create_server(
            lambda: HttpConnection(rt),
            host or cfg.server.host,
            cfg.server.port if port is None else port,
            reuse_port=reuse_port or None,
            backlog=4096,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.worker_id == 0:
            warning = open_relay_warning(host or cfg.server.host, self.port, chain.factories)
            if warning is not None:
                log.warning("%s", warning)
        self._sweeper = loop.create_task(self._sweep_idle())

    async def _start_mocks(self, specs: tuple[MockSpec, ...]) -> None:
        if not specs:
            return
        from llmproxy.runtime.mock_hook import load_mock_hook  # never the mock itself: see proxy.mock_hook

        hook = load_mock_hook()
        for spec in specs:
            mock = await hook.start(spec.host, spec.port, spec.options)
            self.mocks.append(mock)
            self.mock_ports[spec.name] = (spec.host, mock.port)
            log.info("mock upstream %r listening on http://%s:%d", spec.name, spec.host, mock.port)

    async def _sweep_idle(self) -> None:
        assert self.runtime is not None
        interval = max(1.0, min(self.config.pool.keepalive_expiry / 2, 15.0))
        while True:
            await asyncio.sleep(interval)
            self.runtime.pool.expire_idle()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, drain in-flight exchanges within ``grace`` seconds, close all."""
        rt = self.runtime
        grace = self.config.limits.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if rt is not None:
            rt.draining = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while True:
                busy = [c for c in list(rt.connections) if not c.close_if_idle()]
                if not busy or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.05)
            for conn in list(rt.connections):
                conn.abort()
            # Cancelled exchanges run their end hooks (which may await the store)
            # before the factories and the store close under them.
            for task in list(rt.tasks):
                task.cancel()
            if rt.tasks:
                await asyncio.wait(list(rt.tasks), timeout=_END_HOOKS_GRACE)
            for factory in rt.chain.factories:
                try:
                    await factory.close()
                except Exception:
                    log.exception("closing filter %s failed", factory.name)
            await rt.pool.close()
            rt.admin.metrics.publish()  # the last exchanges, for the other workers' scrapes
        if self.context is not None:
            await self.context.cancel_tasks()
        if self.store is not None:
            await self.store.close()
        for mock in self.mocks:
            await mock.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def _serve(
    config: Config,
    host: str,
    port: int,
    worker_id: int,
    reuse_port: bool,
    mock_ports: dict[str, tuple[str, int]] | None,
) -> None:
    proxy = Proxy(config, worker_id=worker_id, mock_ports=mock_ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await proxy.start(host, port, reuse_port=reuse_port)
    except BaseException:
        await proxy.shutdown(0)
        raise
    _freeze_startup_heap()
    if worker_id == 0:
        log.info(
            "llmproxy listening on http://%s:%d (%d worker%s)",
            host,
            proxy.port,
            config.server.workers,
            "s" if config.server.workers > 1 else "",
        )
    await stop.wait()
    log.info("shutting down worker %d (grace %.0fs)", worker_id, config.limits.shutdown_grace)
    await proxy.shutdown()


def _freeze_startup_heap() -> None:
    """Take what startup built (modules, config, filters, tables) out of the cyclic GC's scans.

    Those objects live as long as the worker; left in the collected
    generations, every full collection walks all of them, a pause of several
    milliseconds under load that lands on whichever requests are in flight.
    Frozen, collections only walk request-scoped objects.
    """
    gc.collect()
    gc.freeze()


async def check_config(config: Config) -> list[str]:
    """Build the store and every filter factory without serving; return their names.

    Raises :class:`ConfigError` for anything startup would refuse.
    """
    store = await make_store(config.store, config.file)
    try:
        fake_ports = {m.name: (m.host, m.port or 1) for m in config.mock_upstreams}
        context = FactoryContext(store, 0, fake_ports, config_file=config.file, workers=config.server.workers)
        chain = build_chain(config.filters, context, config.file)
        if config.upstream is not None:
            try:
                config.upstream.target("default", fake_ports)
            except ValueError as exc:
                raise ConfigError(config.file, "upstream.url", str(exc)) from None
        for factory in chain.factories:
            await factory.close()
        return [f.name for f in chain.factories]
    finally:
        await store.close()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _run_mock_process(specs: tuple[MockSpec, ...], ports: dict[str, tuple[str, int]]) -> None:
    from llmproxy.runtime.mock_hook import load_mock_hook  # never the mock itself: see proxy.mock_hook

    hook = load_mock_hook()

    async def main() -> None:
        mocks = [await hook.start(host, port, spec.options) for spec in specs for host, port in [ports[spec.name]]]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for mock in mocks:
            await mock.close()

    uvloop.run(main())


def run(config: Config, host: str | None = None, port: int | None = None) -> int:
    """Serve until a signal; returns the process exit code."""
    host = host or config.server.host
    port = config.server.port if port is None else port
    workers = config.server.workers
    try:
        uvloop.run(check_config(config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if workers == 1:
        try:
            uvloop.run(_serve(config, host, port, 0, False, None))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if port == 0:
        port = _free_port(host)
    mock_ports = {m.name: (m.host, m.port or _free_port(m.host)) for m in config.mock_upstreams}
    children: list[int] = []
    multiproc.prepare(workers)  # before any fork: one scrape sums every worker
    if config.mock_upstreams:
        pid = os.fork()
        if pid == 0:
            _run_mock_process(config.mock_upstreams, mock_ports)
            os._exit(0)
        children.append(pid)
    for worker_id in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            multiproc.worker_started()
            try:
                uvloop.run(_serve(config, host, port, worker_id, True, mock_ports))
            except ConfigError as exc:
                print(f"error: {exc}", file=sys.stderr)
                code = 2
            except BaseException:
                log.exception("worker %d crashed", worker_id)
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        multiproc.worker_exited(child)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    multiproc.cleanup()
    return worst
