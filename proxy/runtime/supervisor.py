"""Processes: one worker in this process, or a supervisor over N forked workers.

:func:`run` is what ``llmproxy serve`` calls. With ``server.workers: 1`` the
worker runs in this process. With more, this process becomes a
:class:`Supervisor`::

    supervisor (sync loop: waitpid + signal flags, no event loop)
      |-- mock upstreams (one process, when the config has mock_upstreams)
      |-- worker 0   \\
      |-- worker 1    }  accept on one listening socket the supervisor opened (server.listen:
      '-- ...        /   shared, the default), or each on its own (reuseport: SO_REUSEPORT)

Contract:

* a port already in use is one ``error:`` line and exit code 1, found
  before any worker is forked (and, should a worker still fail to bind,
  the supervisor stops the others and exits 1: no traceback, no process left);
* a worker that dies (crash, signal) is restarted after a backoff that starts
  at :data:`BACKOFF_START` and doubles to :data:`BACKOFF_MAX` (reset once a
  worker lived :data:`BACKOFF_RESET` seconds), with a log line saying how it
  ended (exit code or signal);
* SIGTERM/SIGINT are passed on to every child, which drains
  (``limits.shutdown_grace``); the supervisor exits 0 once all exited cleanly;
* SIGHUP re-reads and checks the config once here; an invalid config is
  logged and nothing changes, a valid one is passed on (SIGHUP) to every
  worker, which swaps it in, and restarted workers start from it;
* with ``server.listen: shared`` the supervisor binds and listens once, before any
  fork, and every worker (a restarted one too) accepts on that socket: connections the
  kernel queued are never tied to one worker, so a worker killed with SIGKILL loses only
  the exchanges it had accepted; with ``reuseport`` each worker binds its own socket
  (SO_REUSEPORT) and connections still queued on a killed worker's socket are reset
  (unless ``net.ipv4.tcp_migrate_req`` is set);
* a worker never outlives the supervisor: it asks the kernel for SIGTERM when
  its parent dies (``PR_SET_PDEATHSIG``) and checks ``getppid()`` after that,
  so it drains and exits like on a normal shutdown.

``server.pid_file`` (or ``--pid-file``) holds this process's pid while it
serves, for ``llmproxy reload``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from llmproxy.runtime import multiproc
from llmproxy.runtime.app import check_config, serve_worker
from llmproxy.runtime.config import Config, ConfigError, MockSpec, load_config

__all__ = ["BACKOFF_MAX", "BACKOFF_RESET", "BACKOFF_START", "Supervisor", "read_pid_file", "run"]

log = logging.getLogger("llmproxy.supervisor")

#: First restart delay of a worker that died, doubled per death up to :data:`BACKOFF_MAX`.
BACKOFF_START = 0.1
BACKOFF_MAX = 10.0
#: A worker that lived this long resets its slot's backoff.
BACKOFF_RESET = 30.0
#: How often the supervisor loop looks at its children and its signal flags.
_TICK = 0.02
#: Exit code of a worker that could not start (bad config, bind failure): not restarted at startup.
_EXIT_START_FAILED = 3
_PR_SET_PDEATHSIG = 1


def run(config: Config, host: str | None = None, port: int | None = None, pid_file: str | None = None) -> int:
    """Serve ``config`` until SIGTERM/SIGINT; returns the process exit code (1: cannot start)."""
    host = host or config.server.host
    port = config.server.port if port is None else port
    pid_file = pid_file or config.server.pid_file
    try:
        # with several workers, the data they all read (tokenizer tables, prices) is loaded here,
        # once, and shared copy-on-write by every worker forked after it
        uvloop.run(check_config(config, preload=config.server.workers > 1))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        port = _check_bind(host, port, pick=config.server.workers > 1)
    except OSError as exc:
        print(f"error: {_bind_message(host, port, exc)}", file=sys.stderr)
        return 1
    with _pid_file(pid_file):
        if config.server.workers == 1:
            return _run_single(config, host, port)
        listener = None
        if config.server.listen == "shared":
            try:
                listener = _listen(host, port)
            except OSError as exc:
                print(f"error: {_bind_message(host, port, exc)}", file=sys.stderr)
                return 1
        try:
            return Supervisor(config, host, port, listener).run()
        finally:
            if listener is not None:
                listener.close()


def _run_single(config: Config, host: str, port: int) -> int:
    try:
        uvloop.run(serve_worker(config, host, port, 0, False, None))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {_bind_message(host, port, exc)}", file=sys.stderr)
        return 1
    return 0


def _bind_message(host: str, port: int, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the address is already in use (another process listens there)"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def _check_bind(host: str, port: int, *, pick: bool) -> int:
    """Bind ``host:port`` once without SO_REUSEPORT, so that a port anyone holds fails here; the port.

    With ``pick`` a port 0 becomes a free port (the workers must share one).
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        return int(sock.getsockname()[1]) if pick and port == 0 else port


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on (``server.listen: shared``)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _pid_file(path: str | None):  # type: ignore[no-untyped-def]
    """Write this process's pid to ``path`` while serving; remove it after (if still ours)."""
    if path is None:
        yield
        return
    pid = str(os.getpid())
    Path(path).write_text(pid + "\n", encoding="ascii")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if Path(path).read_text(encoding="ascii").strip() == pid:
                os.unlink(path)


def read_pid_file(path: str) -> int:
    """The pid in ``path``; raises ValueError naming the problem (no file, garbage, no such process)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ValueError(f"cannot read pid file {path}: {exc.strerror}") from None
    if not text.isdigit():
        raise ValueError(f"pid file {path} does not hold a pid")
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ValueError(f"pid file {path}: no process {pid} (stale pid file?)") from None
    except PermissionError:
        pass  # it exists; signalling it will say if we may
    return pid


# -- the child side ----------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """Ask for SIGTERM when the supervisor dies (Linux), and catch a death before that."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def _child_signals() -> None:
    """Drop the supervisor's flag-setting handlers: until the worker's loop installs its own,
    SIGTERM/SIGINT end the child and SIGHUP is ignored (there is nothing to reload yet)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def worker_main(
    config: Config,
    host: str,
    port: int,
    worker_id: int,
    mock_ports: dict[str, tuple[str, int]],
    on_ready: Callable[[], None],
    listener: socket.socket | None = None,
) -> int:
    """The body of a forked worker process, run right after the fork; its exit code.

    This is where per-worker process setup goes. ``on_ready`` is called once
    the worker listens. A worker that cannot start (bad config, bind failure)
    says why on one line and exits :data:`_EXIT_START_FAILED`.
    """
    multiproc.worker_started()  # its metrics files, before anything counts
    try:
        uvloop.run(
            serve_worker(
                config, host, port, worker_id, listener is None, mock_ports, lambda _proxy: on_ready(), listener
            )
        )
    except ConfigError as exc:
        print(f"error: worker {worker_id}: {exc}", file=sys.stderr)
        return _EXIT_START_FAILED
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            print(f"error: worker {worker_id}: {_bind_message(host, port, exc)}", file=sys.stderr)
            return _EXIT_START_FAILED
        log.exception("worker %d crashed", worker_id)
        return 1
    except BaseException:
        log.exception("worker %d crashed", worker_id)
        return 1
    return 0


def _mock_main(specs: tuple[MockSpec, ...], ports: dict[str, tuple[str, int]]) -> int:
    """The body of the mock upstreams' process: serve every mock until SIGTERM/SIGINT."""
    import asyncio

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
    return 0


# -- the supervisor ----------------------------------------------------------------
@dataclass
class _Slot:
    """One child the supervisor keeps alive (a worker, or the mocks' process)."""

    name: str
    #: The worker's id, or None for the mocks' process.
    worker_id: int | None
    pid: int = 0
    started_at: float = 0.0
    ready: bool = False
    backoff: float = BACKOFF_START
    restart_at: float | None = None
    #: The mocks' process was told to stop.
    ready_to_stop: bool = False


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by signal {name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class Supervisor:
    """Keeps ``server.workers`` worker processes (and the mocks' process) alive; see the module docstring."""

    def __init__(self, config: Config, host: str, port: int, listener: socket.socket | None = None) -> None:
        """``listener``: the socket the workers share (None: each binds its own, SO_REUSEPORT)."""
        self.config = config
        self.listener = listener
        self.host = host
        self.port = port
        self.pid = os.getpid()
        self.mock_ports = {m.name: (m.host, m.port or _free_port(m.host)) for m in config.mock_upstreams}
        self.slots: list[_Slot] = []
        if config.mock_upstreams:
            self.slots.append(_Slot("mock upstreams", None))
        for worker_id in range(config.server.workers):
            self.slots.append(_Slot(f"worker {worker_id}", worker_id))
        self._stopping = False
        self._signals: list[int] = []
        self._exit = 0
        self._ready_w = -1

    # signal handlers only record; the loop acts
    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        """Start every child, supervise until they all exited after a stop; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        self._ready_w = ready_w
        multiproc.prepare(self.config.server.workers)  # before any fork: one scrape sums every worker
        # what the checked config loaded (modules, preloaded tables) leaves the collected generations:
        # a worker's collections then never write to those objects' pages, which stay shared
        gc.collect()
        gc.freeze()
        try:
            for slot in self.slots:
                self._spawn(slot)
            starting = True
            while True:
                self._handle_signals()
                self._read_ready(ready_r)
                self._reap(starting, ready_r)
                if starting and self._stopping:
                    starting = False
                elif starting and all(slot.ready for slot in self.slots):
                    starting = False
                    log.info(
                        "llmproxy listening on http://%s:%d (%d workers, supervisor pid %d)",
                        self.host,
                        self.port,
                        self.config.server.workers,
                        self.pid,
                    )
                if self._stopping and not any(slot.pid for slot in self.slots if slot.worker_id is not None):
                    if not any(slot.pid for slot in self.slots):
                        return self._exit
                    self._stop_mocks()
                self._restart_due()
                time.sleep(_TICK)
        finally:
            # Python resets its own handlers to the default action when the interpreter exits:
            # a late SIGTERM (an impatient operator, a service manager) would then kill the
            # exiting supervisor with it instead of letting it end with its exit code.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            os.close(ready_r)
            os.close(ready_w)
            self._kill_all(signal.SIGKILL)  # only reached with children left on an unexpected error
            multiproc.cleanup()

    def _spawn(self, slot: _Slot) -> None:
        index = self.slots.index(slot)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the supervisor's loop
            code = 1
            try:
                _child_signals()
                _die_with_parent(self.pid)
                if slot.worker_id is None:
                    if self.listener is not None:
                        self.listener.close()  # the mocks never accept on the proxy's port
                    code = _mock_main(self.config.mock_upstreams, self.mock_ports)
                else:
                    ready_w = self._ready_w

                    def ready() -> None:
                        os.write(ready_w, bytes([index]))

                    code = worker_main(
                        self.config,
                        self.host,
                        self.port,
                        slot.worker_id,
                        self.mock_ports,
                        ready,
                        self.listener,
                    )
            finally:
                os._exit(code)
        slot.pid = pid
        slot.started_at = time.monotonic()
        slot.ready = slot.worker_id is None
        slot.restart_at = None
        log.debug("%s started (pid %d)", slot.name, pid)

    def _read_ready(self, fd: int) -> None:
        try:
            data = os.read(fd, 256)
        except BlockingIOError:
            return
        for index in data:
            if 0 <= index < len(self.slots):
                self.slots[index].ready = True

    def _reap(self, starting: bool, ready_r: int) -> None:
        """Collect children that exited; restart them (after their backoff) or, at startup, stop."""
        for slot in self.slots:
            if not slot.pid:
                continue
            pid, status = os.waitpid(slot.pid, os.WNOHANG)
            if pid == 0:
                continue
            self._read_ready(ready_r)  # a child that got ready wrote so before it exited
            slot.pid = 0
            if slot.worker_id is not None:
                multiproc.worker_exited(pid)
            code = os.waitstatus_to_exitcode(status)
            if self._stopping:
                if code != 0:
                    log.warning("%s (pid %d) %s during shutdown", slot.name, pid, _describe(status))
                    self._exit = 1
                continue
            if starting and not slot.ready:
                # (a worker that cannot start already said why on its own line)
                if code != _EXIT_START_FAILED:
                    log.error("%s (pid %d) %s before it served; stopping", slot.name, pid, _describe(status))
                self._exit = 1
                self._stop(signal.SIGTERM)
                continue
            lived = time.monotonic() - slot.started_at
            if lived >= BACKOFF_RESET:
                slot.backoff = BACKOFF_START
            log.error("%s (pid %d) %s; restarting it in %.1fs", slot.name, pid, _describe(status), slot.backoff)
            slot.restart_at = time.monotonic() + slot.backoff
            slot.backoff = min(slot.backoff * 2, BACKOFF_MAX)

    def _restart_due(self) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if not slot.pid and slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
            else:
                if not self._stopping:
                    log.info("supervisor: %s, stopping the workers", signal.Signals(signum).name)
                self._stop(signum)

    def _stop(self, signum: int) -> None:
        """Pass ``signum`` on to the workers; the mocks' process is stopped once they all exited
        (draining workers still stream from it)."""
        self._stopping = True
        if self.listener is not None:
            self.listener.close()  # once the workers closed theirs, the port refuses connections
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid and slot.worker_id is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def _stop_mocks(self) -> None:
        for slot in self.slots:
            if slot.pid and slot.worker_id is None and not slot.ready_to_stop:
                slot.ready_to_stop = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)

    def _kill_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def _reload(self) -> None:
        """Check the config file once; pass a valid one on to the workers, log why an invalid one is not."""
        try:
            config = load_config(self.config.file)
            config = dataclasses.replace(
                config, server=dataclasses.replace(config.server, workers=self.config.server.workers)
            )
            uvloop.run(check_config(config))
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config: %s", exc)
            return
        self.config = config
        log.info("supervisor: reloading %s in %d workers", config.file, config.server.workers)
        for slot in self.slots:
            if slot.pid and slot.worker_id is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGHUP)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
