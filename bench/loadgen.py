"""The Python load generator: raw sockets, epoll, keep-alive, one or more processes.

Used for open-loop runs (wrk has no fixed-rate mode; wrk2 would) and for
closed-loop runs when wrk is not installed (``--generator python``).

Two modes, both over pre-opened keep-alive connections:

* **closed loop** (:func:`closed_loop`): each connection sends its next
  request as soon as the previous reply is complete, for ``duration``
  seconds or until ``max_requests`` replies have arrived. Latency is send
  to last byte, as wrk measures it.
* **open loop** (:func:`open_loop`): request *k* is due at
  ``t0 + k / rate`` whatever happened before. A due request goes out on an
  idle connection, on a new one while fewer than ``max_conns`` are open, or
  waits in a queue. Latency is measured from the *scheduled* time, not the
  send time, so a slow server cannot slow the generator down and hide its
  own queueing ("coordinated omission"). The generator wakes up with
  millisecond timers, so it sends up to ~1 ms late; that lateness is in the
  direct and in the proxied measurement alike and is reported
  (``late_us_mean``).

With ``procs > 1`` the work is split over forked processes (connections,
or every ``procs``-th request of the schedule) and their histograms are
merged exactly. Each process is a single-threaded epoll loop.

Run by itself for a quick manual measurement::

    python bench/loadgen.py http://127.0.0.1:8080 -c 16 -d 5
    python bench/loadgen.py http://127.0.0.1:8080 --rate 500 -d 5 --stream
"""

from __future__ import annotations

import argparse
import multiprocessing
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from hist import Histogram
from wire import Endpoint, ProtocolError, ResponseParser, build_request, chat_body, parse_url

__all__ = ["LoadResult", "closed_loop", "open_loop"]

_RECV = 256 * 1024


@dataclass
class LoadResult:
    """What one generator run measured (2xx replies only in ``hist``)."""

    hist: Histogram = field(default_factory=Histogram)
    ok: int = 0
    errors: int = 0  # non-2xx replies, resets, unframeable replies
    duration: float = 0.0  # seconds of load (open loop: the schedule's length)
    incomplete: int = 0  # open loop: unanswered when the drain deadline passed
    late_us_mean: float = 0.0  # open loop: mean send time minus scheduled time
    generator: str = "python"

    @property
    def rps(self) -> float:
        return self.ok / self.duration if self.duration > 0 else 0.0

    @classmethod
    def combine(cls, parts: Sequence[LoadResult], *, parallel: bool) -> LoadResult:
        """Merge runs: ``parallel`` ones (processes of one run) or sequential rounds."""
        out = cls(hist=Histogram.merged(p.hist for p in parts), generator=parts[0].generator if parts else "python")
        out.ok = sum(p.ok for p in parts)
        out.errors = sum(p.errors for p in parts)
        out.incomplete = sum(p.incomplete for p in parts)
        durations = [p.duration for p in parts]
        out.duration = (max(durations) if parallel else sum(durations)) if parts else 0.0
        sent = sum(p.ok + p.errors for p in parts)
        if sent:
            out.late_us_mean = sum(p.late_us_mean * (p.ok + p.errors) for p in parts) / sent
        return out

    def summary(self) -> dict[str, Any]:
        """The JSON form: counts, requests/s and latency percentiles in ms."""
        out: dict[str, Any] = {
            "requests": self.ok,
            "errors": self.errors,
            "duration_s": round(self.duration, 3),
            "rps": round(self.rps, 1),
            **self.hist.percentiles_ms((50, 90, 99, 99.9)),
            "mean": round(self.hist.mean_us() / 1000, 3) if self.hist.count else None,
            "max": round(self.hist.max_us() / 1000, 3),
            "generator": self.generator,
        }
        if self.incomplete or self.late_us_mean:
            out["incomplete"] = self.incomplete
            out["late_us_mean"] = round(self.late_us_mean, 1)
        return out


class _Conn:
    """One keep-alive client connection and the exchange in flight on it."""

    __slots__ = ("fd", "parser", "sched", "sock")

    def __init__(self, endpoint: Endpoint) -> None:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
        sock.settimeout(None)  # blocking: only read after epoll says so; sends are small
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.parser = ResponseParser()
        self.sched = 0.0


class _Engine:
    """The epoll loop's shared state: connections by fd, counters, latency counts."""

    def __init__(self, endpoint: Endpoint, requests: Sequence[bytes]) -> None:
        if not requests:
            raise ValueError("no requests to send")
        self.endpoint = endpoint
        self.requests = tuple(requests)
        self.poll = select.epoll()
        self.by_fd: dict[int, _Conn] = {}
        self.counts: dict[int, int] = {}
        self.ok = 0
        self.errors = 0
        self.sent = 0
        self.late = 0.0

    def open(self) -> _Conn:
        conn = _Conn(self.endpoint)
        self.by_fd[conn.fd] = conn
        self.poll.register(conn.fd, select.EPOLLIN)
        return conn

    def close(self, conn: _Conn) -> None:
        if self.by_fd.pop(conn.fd, None) is not None:
            self.poll.unregister(conn.fd)
        conn.sock.close()

    def send(self, conn: _Conn, sched: float, now: float) -> _Conn:
        """Send the next request on ``conn`` (on a fresh connection if it was closed); return the one used."""
        request = self.requests[self.sent % len(self.requests)]
        try:
            conn.sock.sendall(request)
        except OSError:  # the server closed an idle connection: retry once on a new one
            self.close(conn)
            conn = self.open()
            conn.sock.sendall(request)
        conn.sched = sched
        self.late += now - sched
        self.sent += 1
        return conn

    def receive(self, conn: _Conn, now: float) -> bool | None:
        """Read what arrived. True: a reply completed (recorded); False: not yet; None: failed."""
        try:
            data = conn.sock.recv(_RECV)
            done = conn.parser.feed(data) if data else conn.parser.eof()
        except (OSError, ProtocolError, ValueError):
            done, data = False, b""
        if not done:
            if data:
                return False
            self.errors += 1
            return None
        if 200 <= conn.parser.status < 300:
            self.ok += 1
            us = int((now - conn.sched) * 1_000_000)
            self.counts[us] = self.counts.get(us, 0) + 1
        else:
            self.errors += 1
        if not conn.parser.keep_alive:
            return None  # complete, but the connection must be replaced
        conn.parser.reset()
        return True

    def completed(self, timeout: float) -> Iterator[tuple[_Conn, float]]:
        """Poll once; yield (connection ready for a new request, time) per finished response.

        A connection that failed or was closed by the server is replaced by a fresh one.
        """
        for fd, _ in self.poll.poll(timeout):
            conn = self.by_fd.get(fd)
            if conn is None:
                continue
            now = time.monotonic()
            state = self.receive(conn, now)
            if state is False:
                continue
            if state is None:
                self.close(conn)
                conn = self.open()
            yield conn, now

    def result(self, duration: float) -> LoadResult:
        return LoadResult(
            hist=Histogram(self.counts),
            ok=self.ok,
            errors=self.errors,
            duration=duration,
            late_us_mean=self.late / self.sent * 1e6 if self.sent else 0.0,
        )

    def shutdown(self) -> None:
        for conn in list(self.by_fd.values()):
            self.close(conn)
        self.poll.close()


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _closed_loop_local(
    endpoint: Endpoint,
    requests: Sequence[bytes],
    connections: int,
    duration: float,
    max_requests: int | None,
    start_at: float,
) -> LoadResult:
    eng = _Engine(endpoint, requests)
    try:
        conns = [eng.open() for _ in range(connections)]
        _sleep_until(start_at)
        t0 = time.monotonic()
        end = t0 + duration
        for conn in conns:
            eng.send(conn, t0, t0)
        now = t0
        limit = max_requests if max_requests is not None else 1 << 62
        while now < end and eng.ok + eng.errors < limit and eng.by_fd:
            for conn, done_at in eng.completed(min(end - now, 0.1)):
                if done_at < end:
                    eng.send(conn, done_at, done_at)
            now = time.monotonic()
        eng.late = 0.0
        return eng.result(min(now, end) - t0)
    finally:
        eng.shutdown()


def _open_loop_local(
    endpoint: Endpoint,
    requests: Sequence[bytes],
    rate: float,
    duration: float,
    start_at: float,
    index: int,
    stride: int,
    max_conns: int,
    drain: float,
) -> LoadResult:
    eng = _Engine(endpoint, requests)
    total = int(rate * duration)
    interval = 1.0 / rate
    idle: list[_Conn] = [eng.open() for _ in range(min(max_conns, 8))]
    backlog: deque[float] = deque()
    busy = 0
    try:
        _sleep_until(start_at)
        k = index
        due = start_at + k * interval
        deadline = start_at + duration + drain
        while True:
            now = time.monotonic()
            while k < total and due <= now:
                if idle:
                    eng.send(idle.pop(), due, now)
                    busy += 1
                elif len(eng.by_fd) < max_conns:
                    eng.send(eng.open(), due, now)
                    busy += 1
                else:
                    backlog.append(due)
                k += stride
                due = start_at + k * interval
            if k >= total and not busy and not backlog:
                break
            if now >= deadline:
                break
            timeout = (due - now) if k < total else min(deadline - now, 0.05)
            for conn, done_at in eng.completed(max(timeout, 0.0)):
                if backlog:
                    eng.send(conn, backlog.popleft(), done_at)
                else:
                    idle.append(conn)
                    busy -= 1
        result = eng.result(duration)
        result.incomplete = busy + len(backlog)
        return result
    finally:
        eng.shutdown()


def _child(fn: Callable[..., LoadResult], args: tuple[Any, ...], pipe: Any) -> None:
    try:
        pipe.send(fn(*args))
    except BaseException as exc:
        pipe.send(exc)
    finally:
        pipe.close()


def _fan_out(fn: Callable[..., LoadResult], arg_sets: list[tuple[Any, ...]]) -> LoadResult:
    """Run ``fn`` once per argument set, in forked processes when there are several."""
    if len(arg_sets) == 1:
        return fn(*arg_sets[0])
    ctx = multiprocessing.get_context("fork")
    running = []
    for args in arg_sets:
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(fn, args, sender), daemon=True)
        proc.start()
        sender.close()
        running.append((proc, receiver))
    parts = []
    for proc, receiver in running:
        part = receiver.recv()
        proc.join()
        if isinstance(part, BaseException):
            raise part
        parts.append(part)
    return LoadResult.combine(parts, parallel=True)


def closed_loop(
    endpoint: Endpoint,
    requests: Sequence[bytes],
    connections: int,
    duration: float,
    *,
    procs: int = 1,
    max_requests: int | None = None,
) -> LoadResult:
    """``connections`` back-to-back clients for ``duration`` s (or ``max_requests`` replies)."""
    procs = max(1, min(procs, connections))
    start_at = time.monotonic() + (0.05 if procs == 1 else 0.3)
    arg_sets = []
    for i in range(procs):
        share = connections // procs + (1 if i < connections % procs else 0)
        budget = None if max_requests is None else max(1, max_requests // procs)
        arg_sets.append((endpoint, requests, share, duration, budget, start_at))
    return _fan_out(_closed_loop_local, arg_sets)


def open_loop(
    endpoint: Endpoint,
    requests: Sequence[bytes],
    rate: float,
    duration: float,
    *,
    procs: int = 1,
    max_conns: int = 512,
    drain: float = 2.0,
) -> LoadResult:
    """Requests due at a fixed ``rate`` per second for ``duration`` s; latency from the schedule."""
    procs = max(1, procs)
    start_at = time.monotonic() + (0.05 if procs == 1 else 0.3)
    per_proc_conns = max(1, max_conns // procs)
    arg_sets = [(endpoint, requests, rate, duration, start_at, i, procs, per_proc_conns, drain) for i in range(procs)]
    return _fan_out(_open_loop_local, arg_sets)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: one run against a URL, JSON summary on stdout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="http://host:port[/path] (default path /v1/chat/completions)")
    ap.add_argument("-c", "--connections", type=int, default=16)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=None, help="open loop at this many requests/s")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--stream", action="store_true", help="request SSE replies")
    ap.add_argument("--model", default="gpt-4o-mini")
    args = ap.parse_args(argv)
    endpoint = parse_url(args.url)
    request = build_request(endpoint, chat_body(args.model, args.stream))
    if args.rate:
        result = open_loop(endpoint, [request], args.rate, args.duration, procs=args.procs)
    else:
        result = closed_loop(endpoint, [request], args.connections, args.duration, procs=args.procs)
    sys.stdout.write(orjson.dumps(result.summary(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
