"""Assembling and running a proxy from a :class:`~llmproxy.runtime.config.Config`.

Lifecycle of one worker (:class:`Proxy`)::

    start():    store -> mock upstreams -> filter factories (start) -> listen
    serve:      until SIGTERM/SIGINT
    shutdown(): stop accepting -> close idle connections -> let in-flight
                exchanges (streams included) finish for ``shutdown_grace``
                seconds -> cut the rest (they answer ``server_shutdown`` and
                run their end hooks) -> close factories, pool, store, mocks

    reload():   build the next generation from a new config, swap it in;
                the old one's factories close when its last exchange ends

Processes (one worker in-process, or a supervisor over N forked workers)
are :mod:`llmproxy.runtime.supervisor`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

from llmproxy.context import FactoryContext
from llmproxy.engine.cycle import Runtime
from llmproxy.filter import FilterFactory
from llmproxy.http.server import HttpConnection
from llmproxy.runtime import logs
from llmproxy.runtime.accesslog import AccessLog
from llmproxy.runtime.admin import AdminPages
from llmproxy.runtime.config import Config, ConfigError, MockSpec, load_config
from llmproxy.runtime.plugins import build_chain
from llmproxy.state.store import MemoryStore, SharedStore
from llmproxy.upstream import UpstreamPool
from llmproxy.upstream.client import UpstreamClient

__all__ = [
    "Proxy",
    "check_config",
    "is_loopback",
    "make_store",
    "open_relay_warning",
    "restart_only_changes",
    "serve_worker",
]

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
    """One worker: the listening server and the config generations its exchanges run on.

    The first generation is built by :meth:`start`; :meth:`reload` builds the
    next one from a new config and swaps it in atomically. The store, the mock upstreams, the
    upstream pool and the core counters live as long as the worker.
    """

    def __init__(
        self, config: Config, *, worker_id: int = 0, mock_ports: dict[str, tuple[str, int]] | None = None
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        #: The newest generation (where new connections and requests go).
        self.runtime: Runtime | None = None
        self.store: SharedStore | None = None
        self.context: FactoryContext | None = None
        #: Every generation not yet retired (the newest last), with its factory context.
        self.generations: list[tuple[Runtime, FactoryContext]] = []
        self.mocks: list[Any] = []
        self.mock_ports: dict[str, tuple[str, int]] = dict(mock_ports or {})
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._host = config.server.host
        self.port = 0

    async def start(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        """Build everything and start listening; raises ConfigError on bad config, OSError when the bind fails.

        ``sock``: a listening socket to accept on (a supervisor's, shared by its workers)
        instead of binding ``host:port``.
        """
        cfg = self.config
        logs.set_worker(self.worker_id)  # every log line of this process names its worker
        self.store = await make_store(cfg.store, cfg.file)
        if not self.mock_ports:
            await self._start_mocks(cfg.mock_upstreams)
        pool = UpstreamPool(
            cfg.pool.max_per_origin,
            cfg.pool.keepalive_expiry,
            max_head_bytes=cfg.limits.max_upstream_header_bytes,
            max_head_fields=cfg.limits.max_upstream_header_count,
        )
        runtime, context = await self.build_generation(cfg, pool, None)
        self._install(runtime, context)
        _freeze_startup_heap()  # after the filters' start(): price books and tokenizer tables too
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(self._new_connection, sock=sock, backlog=4096)
        else:
            self._server = await loop.create_server(
                self._new_connection,
                host or cfg.server.host,
                cfg.server.port if port is None else port,
                reuse_port=reuse_port or None,
                backlog=4096,
            )
        self.port = self._server.sockets[0].getsockname()[1]
        self._host = host or cfg.server.host
        self._warn_open_relay(runtime)
        self._sweeper = loop.create_task(self._sweep_idle())

    def _new_connection(self) -> HttpConnection:
        assert self.runtime is not None
        return HttpConnection(self.runtime)

    def _warn_open_relay(self, runtime: Runtime) -> None:
        if self.worker_id == 0:
            warning = open_relay_warning(self._host, self.port, runtime.chain.factories)
            if warning is not None:
                log.warning("%s", warning)

    async def build_generation(
        self, cfg: Config, pool: UpstreamPool, previous: Runtime | None
    ) -> tuple[Runtime, FactoryContext]:
        """Build and start a generation's filter chain for ``cfg`` (not yet serving).

        ``previous`` (on a reload) passes its pool, connections and core
        counters on. Raises :class:`ConfigError` when a filter refuses its
        config; a factory whose ``start()`` fails is closed again with the
        ones started before it, and the error propagates.
        """
        assert self.store is not None
        admin = AdminPages(cfg.server.admin_allow, previous.admin.metrics if previous is not None else None)
        context = FactoryContext(
            self.store,
            self.worker_id,
            self.mock_ports,
            admin,
            UpstreamClient(pool),
            config_file=cfg.file,
            workers=cfg.server.workers,
        )
        chain = build_chain(cfg.filters, context, cfg.file)
        default_upstream = cfg.upstream.target("default", self.mock_ports) if cfg.upstream else None
        runtime = Runtime(
            chain=chain,
            pool=pool,
            limits=cfg.limits,
            default_upstream=default_upstream,
            validate_json=cfg.server.validate_json,
            overhead_header=cfg.server.overhead_header,
            access_log=AccessLog(json_lines=cfg.server.access_log == "json", enabled=cfg.server.access_log != "off"),
            admin=admin,
        )
        if previous is not None:
            runtime.connections = previous.connections
        started: list[FilterFactory] = []
        try:
            for factory in chain.factories:
                await factory.start()
                started.append(factory)
        except BaseException:
            await _close_generation(started, context)
            raise
        return runtime, context

    def _install(self, runtime: Runtime, context: FactoryContext) -> None:
        """Make ``runtime`` the newest generation (one assignment each: atomic on the loop)."""
        previous = self.runtime
        self.generations.append((runtime, context))
        self.runtime = runtime
        self.context = context
        if previous is not None:
            previous.successor = runtime
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._retire(previous), name="retire-generation")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: Runtime) -> None:
        """Once the last exchange of ``old`` ended: close its factories and stop its ticks."""
        while old.busy():  # (an exchange can still start on it: a head already being read)
            await asyncio.wait(old.tasks | old.finishing)
        for index, (runtime, context) in enumerate(self.generations):
            if runtime is old:
                del self.generations[index]
                await _close_generation(runtime.chain.factories, context)
                break
        # what the old generation built was frozen out of the GC's scans: let it be collected
        gc.unfreeze()
        _freeze_startup_heap()

    async def reload(self, cfg: Config) -> bool:
        """Swap in a generation built from ``cfg``; False (old one kept, reason logged) when it fails.

        Settings that only a restart changes (listen address, workers, store,
        mock upstreams, pool) keep their old values, with a warning.
        """
        async with self._reload_lock:
            if self.runtime is None or self.runtime.draining:
                log.warning("reload ignored: the worker is %s", "starting" if self.runtime is None else "shutting down")
                return False
            for note in restart_only_changes(self.config, cfg):
                log.warning("reload: %s", note)
            try:
                runtime, context = await self.build_generation(cfg, self.runtime.pool, self.runtime)
            except ConfigError as exc:
                log.error("reload refused, still serving the previous config: %s", exc)
                return False
            except Exception as exc:
                log.error("reload refused, still serving the previous config: a filter failed to start: %s", exc)
                return False
            self._install(runtime, context)
            self.config = cfg
            self._warn_open_relay(runtime)
            log.info(
                "worker %d reloaded %s (%d filter%s)",
                self.worker_id,
                cfg.file,
                len(runtime.chain.factories),
                "" if len(runtime.chain.factories) == 1 else "s",
            )
            return True

    async def reload_file(self) -> bool:
        """Re-read :attr:`config`'s file and :meth:`reload` it; an invalid file is logged and changes nothing."""
        try:
            cfg = load_config(self.config.file)
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config: %s", exc)
            return False
        if cfg.server.workers != self.config.server.workers:
            log.warning("reload: server.workers changed: it takes effect at the next restart (kept the running value)")
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, workers=self.config.server.workers))
        return await self.reload(cfg)

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
        interval = max(1.0, min(self.config.pool.keepalive_expiry / 2, 15.0))
        while True:
            await asyncio.sleep(interval)
            if self.runtime is not None:
                self.runtime.pool.expire_idle()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, drain in-flight exchanges within ``grace`` seconds, cut the rest, close all.

        Cut exchanges answer :func:`~llmproxy.engine.cycle.shutdown_error`
        (a 503 envelope before the head, a final SSE error event in the
        client's protocol after it) and run their end hooks before the
        factories and the store close.
        """
        grace = self.config.limits.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._retiring):
            task.cancel()
        generations = [runtime for runtime, _ in self.generations]
        if generations:
            connections = generations[-1].connections
            for runtime in generations:
                runtime.draining = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while True:
                busy = [c for c in list(connections) if not c.close_if_idle()]
                if not busy or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.05)
            # Cut what is left through the exchanges' own error path, then let their end
            # hooks (which may await the store) finish before the factories and the store close.
            running: list[asyncio.Task[None]] = []
            for runtime in generations:
                runtime.cut = True
                for task in list(runtime.tasks):
                    task.cancel()
                running += runtime.tasks | runtime.finishing
            if running:
                await asyncio.wait(running, timeout=_END_HOOKS_GRACE)
            close_by = loop.time() + 1.0
            while connections and loop.time() < close_by:  # noqa: ASYNC110 (the cut answers being flushed)
                await asyncio.sleep(0.02)
            for conn in list(connections):
                conn.abort()
            for runtime, context in self.generations:
                await _close_generation(runtime.chain.factories, context)
            self.generations.clear()
            await generations[-1].pool.close()
            generations[-1].admin.metrics.publish()  # the last exchanges, for the other workers' scrapes
        if self.store is not None:
            await self.store.close()
        for mock in self.mocks:
            await mock.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def _close_generation(factories: Sequence[FilterFactory], context: FactoryContext) -> None:
    """Stop a generation's ticks and close its factories (errors logged)."""
    await context.cancel_tasks()
    for factory in factories:
        try:
            await factory.close()
        except Exception:
            log.exception("closing filter %s failed", factory.name)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """What differs between ``old`` and ``new`` that a reload does not apply (one note each)."""
    notes = []
    for name, before, after in (
        ("server.host", old.server.host, new.server.host),
        ("server.port", old.server.port, new.server.port),
        ("server.pid_file", old.server.pid_file, new.server.pid_file),
        ("store", old.store, new.store),
        ("mock_upstreams", old.mock_upstreams, new.mock_upstreams),
        ("pool", old.pool, new.pool),
    ):
        if before != after:
            notes.append(f"{name} changed: it takes effect at the next restart (kept the running value)")
    return notes


async def serve_worker(
    config: Config,
    host: str,
    port: int,
    worker_id: int,
    reuse_port: bool,
    mock_ports: dict[str, tuple[str, int]] | None,
    on_ready: Callable[[Proxy], None] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT (then drain); SIGHUP reloads its config file.

    ``on_ready`` is called once the worker listens. Raises ConfigError or
    OSError (the bind) when the worker cannot start.
    """
    proxy = Proxy(config, worker_id=worker_id, mock_ports=mock_ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(proxy.reload_file())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await proxy.start(host, port, reuse_port=reuse_port, sock=sock)
    except BaseException:
        await proxy.shutdown(0)
        raise
    log.info("worker %d (pid %d) listening on http://%s:%d", worker_id, os.getpid(), host, proxy.port)
    if on_ready is not None:
        on_ready(proxy)
    await stop.wait()
    # A second SIGTERM/SIGINT (a supervisor passing one on, an impatient operator) or a SIGHUP
    # must neither cut the drain nor kill the process with the default action once the loop is gone.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("shutting down worker %d (grace %gs)", worker_id, proxy.config.limits.shutdown_grace)
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


async def check_config(config: Config, preload: bool = False) -> list[str]:
    """Build the store and every filter factory without serving; return their names.

    Raises :class:`ConfigError` for anything startup would refuse. ``preload``:
    also call every factory's :meth:`~llmproxy.filter.FilterFactory.preload`
    (the supervisor does, before it forks the workers that share the result).
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
        if preload:
            for factory in chain.factories:
                factory.preload()
        for factory in chain.factories:
            await factory.close()
        return [f.name for f in chain.factories]
    finally:
        await store.close()
