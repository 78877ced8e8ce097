"""Operations as an operator meets them: real processes, real signals, real sockets.

Supervisor (restart, signals, no orphans, a port in use), hot reload under
load, shutdown with streams in flight (drained, or cut with an error event the
SDKs raise on). Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from .serving import Served, free_port, processes_with, wait_for

BASE = """
server:
  access_log: {access_log}
  pid_file: {pid_file}
limits:
  shutdown_grace: {grace}
mock_upstreams:
  - name: m
    tokens: 4
filters:
  - name: routing
    config:
      providers:
        - name: oa
          type: openai
          base_url: mock://m/v1
          keys: [sk-test-openai]
          models: {models}
        - name: an
          type: anthropic
          base_url: mock://m
          keys: [sk-test-anthropic]
          models: {{claude-x: mock-claude}}
"""


def write_config(
    path: Path, models: str = "{gpt-x: mock-gpt}", grace: float = 5, access_log: str = "off", pid_file: str = ""
) -> Path:
    path.write_text(
        BASE.format(models=models, grace=grace, access_log=access_log, pid_file=pid_file or str(path) + ".pid")
    )
    return path


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Started instances; whatever a test leaves running is killed."""
    started: list[Served] = []
    yield started
    for instance in started:
        instance.kill_all()


def start(started: list[Served], config: Path, workers: int = 1, log_level: str = "info") -> Served:
    instance = Served(config, free_port(), "--workers", str(workers), log_level=log_level)
    started.append(instance)
    instance.wait_ready(workers)
    return instance


def chat(port: int, model: str = "gpt-x", conn: http.client.HTTPConnection | None = None) -> int:
    """One non-streamed chat completion; its status (raises on a transport failure)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        headers = {"content-type": "application/json"}
        if own:
            headers["connection"] = "close"
        conn.request("POST", "/v1/chat/completions", body, headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        if own:
            conn.close()


class Load:
    """Threads sending requests in a loop; counts successes and failures (with their reason)."""

    def __init__(self, port: int, threads: int = 4, keep_alive: bool = False) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.failed_at: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(keep_alive,), daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, keep_alive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            try:
                if keep_alive and conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                status = chat(self.port, conn=conn)
                outcome = None if status == 200 else f"status {status}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
                if conn is not None:
                    conn.close()
                    conn = None
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)
                    self.failed_at.append(time.monotonic())
        if conn is not None:
            conn.close()

    def count(self) -> int:
        with self._lock:
            return self.ok

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


# -- supervisor -------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_is_one_error_line_and_exit_1(tmp_path: Path, workers: int) -> None:
    config = write_config(tmp_path / "c.yaml")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "llmproxy",
                "serve",
                "-c",
                str(config),
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: cannot listen on 127.0.0.1:{port}: the address is already in use (another process listens there)"
    ], out.stderr
    wait_for(lambda: not processes_with(str(config)), 5, "no process left")


def test_a_killed_worker_is_restarted_and_only_its_requests_fail(tmp_path: Path, served: list[Served]) -> None:
    threads = 4
    proxy = start(served, write_config(tmp_path / "c.yaml"), workers=2)
    load = Load(proxy.port, threads)
    try:
        wait_for(lambda: load.count() > 50, 20, "load to run")
        victim = proxy.workers[1]
        mark = proxy.mark()
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        proxy.wait_log(rf"worker 1 \(pid {victim}\) was killed by signal SIGKILL; restarting it in", 5, mark)
        found = proxy.wait_log(r"worker 1 \(pid (\d+)\) listening", 5, mark)
        assert int(found.group(1)) != victim
        assert time.monotonic() - killed_at < 1.0 + 0.5  # (the log line's own latency on a loaded machine)
        before = load.count()
        wait_for(lambda: load.count() > before + 50, 20, "load to go on after the restart")
    finally:
        load.stop()
    # Only what was on the killed worker fails: the requests in flight on it (one per client
    # thread at most: the workers share one listening socket, so no connection waits in a
    # queue of the dead worker's own), all within the moment the process took to die.
    assert all(at - killed_at < 1.0 for at in load.failed_at), (load.failures, [t - killed_at for t in load.failed_at])
    assert len(load.failures) <= threads, load.failures
    assert proxy.stop() == 0


def test_a_stopped_then_killed_worker_strands_no_new_connection(tmp_path: Path, served: list[Served]) -> None:
    """The workers accept on one socket: while a worker is frozen (SIGSTOP) every new connection
    is served by the other, and killing the frozen one loses none of them. (With a socket per
    worker, SO_REUSEPORT, about half would wait in the frozen worker's queue and be reset.)"""
    proxy = start(served, write_config(tmp_path / "c.yaml"), workers=2)
    frozen = proxy.workers[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        started = time.monotonic()
        statuses = [chat(proxy.port) for _ in range(24)]  # a new connection each (timeout 10 s)
        assert statuses == [200] * 24
        assert time.monotonic() - started < 8.0  # none waited for the frozen worker
        mark = proxy.mark()
        os.kill(frozen, signal.SIGKILL)
        proxy.wait_log(rf"worker 1 \(pid {frozen}\) was killed by signal SIGKILL", 5, mark)
        assert [chat(proxy.port) for _ in range(8)] == [200] * 8
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert proxy.stop() == 0


def test_a_worker_that_keeps_dying_is_restarted_with_a_growing_backoff(tmp_path: Path, served: list[Served]) -> None:
    proxy = start(served, write_config(tmp_path / "c.yaml"), workers=2)
    delays = []
    for _ in range(3):
        victim = proxy.workers[0]
        mark = proxy.mark()
        os.kill(victim, signal.SIGKILL)
        found = proxy.wait_log(
            rf"worker 0 \(pid {victim}\) was killed by signal SIGKILL; restarting it in (\S+)s", 5, mark
        )
        delays.append(found.group(1))
        proxy.wait_log(r"worker 0 \(pid \d+\) listening", 5, mark)
        wait_for(lambda v=victim: proxy.workers[0] != v, 5, "the new worker's pid")
    assert delays == ["0.1", "0.2", "0.4"]
    assert chat(proxy.port) == 200
    assert proxy.stop() == 0


def test_workers_exit_when_the_supervisor_dies(tmp_path: Path, served: list[Served]) -> None:
    config = write_config(tmp_path / "c.yaml")
    proxy = start(served, config, workers=2)
    workers = list(proxy.workers.values())
    proxy.proc.kill()  # SIGKILL: no chance to pass anything on
    proxy.proc.wait(5)
    wait_for(lambda: not processes_with(str(config)), 10, "the orphaned workers to drain and exit")
    assert all(pid not in processes_with(str(config)) for pid in workers)


# -- hot reload -------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_reload_under_load_no_failure_new_route_live_invalid_refused(
    tmp_path: Path, served: list[Served], workers: int
) -> None:
    config = write_config(tmp_path / "c.yaml")
    proxy = start(served, config, workers=workers)
    assert chat(proxy.port, "gpt-new") == 404
    load = Load(proxy.port, 3, keep_alive=True)
    try:
        wait_for(lambda: load.count() > 30, 20, "load to run")
        write_config(config, models="{gpt-x: mock-gpt, gpt-new: mock-gpt}")
        out = subprocess.run(
            [sys.executable, "-m", "llmproxy", "reload", "-c", str(config)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        sent = time.monotonic()  # (the signal is out; the reload command's own start-up does not count)
        wait_for(lambda: chat(proxy.port, "gpt-new") == 200, 5, "the new route")
        assert time.monotonic() - sent < 1.0
        assert all(chat(proxy.port, "gpt-new") == 200 for _ in range(10))  # every worker has it
        before = load.count()
        wait_for(lambda: load.count() > before + 30, 20, "load to go on after the reload")

        # an invalid config changes nothing and says why
        mark = proxy.mark()
        config.write_text(config.read_text().replace("type: anthropic", "type: anthropic\n          weight: -1"))
        proxy.signal(signal.SIGHUP)
        proxy.wait_log(
            rf"reload refused, still serving the previous config: {config}: "
            r"filters\[0\]\.config: .*providers\[1\]\.weight: must be a number greater than 0",
            10,
            mark,
        )
        assert all(chat(proxy.port, "gpt-new") == 200 for _ in range(10))
        before = load.count()
        wait_for(lambda: load.count() > before + 30, 20, "load to go on after the refused reload")
    finally:
        load.stop()
    assert load.failures == []
    assert proxy.stop() == 0


def test_reload_needs_a_pid_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "llmproxy", "reload", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1
    assert f"cannot read pid file {config}.pid" in out.stderr


# -- shutdown -----------------------------------------------------------------------
STREAMS = 50


async def _streams(port: int, tokens: int, itl_ms: int, started: threading.Event) -> list[str]:
    """STREAMS streams (half OpenAI, half Anthropic SDK); each one's outcome: done, or the error it raised."""
    headers = {"x-mock-tokens": str(tokens), "x-mock-itl-ms": str(itl_ms)}
    oa = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60, default_headers=headers
    )
    an = anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0, timeout=60, default_headers=headers
    )
    first = asyncio.Semaphore(0)

    async def one_openai() -> str:
        try:
            stream = await oa.chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            seen = False
            async for _chunk in stream:
                if not seen:
                    seen = True
                    first.release()
            return "done"
        except openai.APIError as exc:
            return f"openai {type(exc).__name__}: {exc.message}"

    async def one_anthropic() -> str:
        try:
            stream = await an.messages.create(
                model="claude-x", max_tokens=500, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            seen = False
            async for event in stream:
                if not seen:
                    seen = True
                    first.release()
                last = event.type
            return "done" if last == "message_stop" else f"anthropic ended at {last}"
        except anthropic.APIError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            return f"anthropic {type(exc).__name__}: {body.get('error', {}).get('message', exc.message)}"

    tasks = [asyncio.ensure_future(one_openai() if i % 2 else one_anthropic()) for i in range(STREAMS)]
    for _ in range(STREAMS):
        await asyncio.wait_for(first.acquire(), 30)
    started.set()
    results = await asyncio.gather(*tasks)
    await oa.close()
    await an.close()
    return list(results)


def _run_streams(port: int, tokens: int, itl_ms: int) -> tuple[threading.Event, list[list[str]], threading.Thread]:
    started = threading.Event()
    results: list[list[str]] = []
    thread = threading.Thread(
        target=lambda: results.append(asyncio.run(_streams(port, tokens, itl_ms, started))), daemon=True
    )
    thread.start()
    return started, results, thread


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_a_long_grace_lets_50_streams_finish(tmp_path: Path, served: list[Served], workers: int) -> None:
    proxy = start(served, write_config(tmp_path / "c.yaml", grace=30), workers=workers)
    started, results, thread = _run_streams(proxy.port, tokens=40, itl_ms=25)  # ~1 s per stream
    assert started.wait(30), "the streams did not start"
    proxy.signal(signal.SIGTERM)
    thread.join(60)
    assert results and results[0] == ["done"] * STREAMS
    assert proxy.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_a_short_grace_cuts_streams_with_an_error_event(
    tmp_path: Path, served: list[Served], workers: int
) -> None:
    proxy = start(served, write_config(tmp_path / "c.yaml", grace=0.3, access_log="text"), workers=workers)
    started, results, thread = _run_streams(proxy.port, tokens=1000, itl_ms=20)  # ~20 s per stream
    assert started.wait(30), "the streams did not start"
    cut_at = time.monotonic()
    proxy.signal(signal.SIGTERM)
    thread.join(30)
    assert time.monotonic() - cut_at < 10
    assert results, "the clients did not finish"
    outcomes = results[0]
    openai_cut = [o for o in outcomes if o.startswith("openai ")]
    anthropic_cut = [o for o in outcomes if o.startswith("anthropic ")]
    assert len(openai_cut) == len(anthropic_cut) == STREAMS // 2
    # the SDKs raise the event's error (an API error, not a connection error)
    assert all(o.startswith("openai APIError: the server is shutting down") for o in openai_cut), outcomes
    assert all(o.startswith("anthropic APIStatusError: the server is shutting down") for o in anthropic_cut), outcomes
    assert proxy.stop() == 0
    log = proxy.log()
    assert log.count("error=server_shutdown") == STREAMS
    assert "client_closed_request" not in log


def test_check_print_shows_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        textwrap.dedent(
            """
            upstream:
              url: http://127.0.0.1:9/v1
              headers: {authorization: "Bearer ${SECRET_TOKEN}", x-team: blue}
            filters:
              - name: routing
                config:
                  providers:
                    - {name: oa, type: openai, base_url: "http://127.0.0.1:9/v1", keys: ["${SECRET_TOKEN}"],
                       models: [gpt-x]}
            """
        )
    )
    env = {"SECRET_TOKEN": "sk-very-secret-value", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", "--print", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "sk-very-secret-value" not in out.stdout + out.stderr
    assert "authorization: '***'" in out.stdout
    assert "x-team: blue" in out.stdout
    assert "- '***'" in out.stdout  # the provider's key
    assert "shutdown_grace: 30" in out.stdout  # a default filled in
    assert "workers: 1" in out.stdout


def _memory_mib(pid: int) -> dict[str, float]:
    """``/proc/PID/smaps_rollup`` fields in MiB (Rss, Pss, Shared_Dirty, Private_Dirty, ...)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) / 1024
    return fields


def test_workers_share_the_tokenizer_and_prices_the_supervisor_preloaded(tmp_path: Path, served: list[Served]) -> None:
    """With several workers the tokenizer's tables and the price data are loaded once, in the
    supervisor before it forks, and every worker (a restarted one too) shares those pages: a
    worker's own memory is a fraction of what it maps. (Loaded in each worker, the tables are
    private to it: tens of MiB more per worker.)"""
    config = write_config(tmp_path / "c.yaml", models="{gpt-4o-mini: gpt-4o-mini, gpt-x: mock-gpt}")
    text = config.read_text().replace("filters:\n", "filters:\n  - name: metering\n", 1)
    config.write_text(text)
    proxy = start(served, config, workers=2)
    for _ in range(4):
        assert chat(proxy.port, "gpt-4o-mini") == 200  # each worker counts, with the shared tables
    mark = proxy.mark()
    victim = proxy.workers[1]
    os.kill(victim, signal.SIGKILL)
    found = proxy.wait_log(r"worker 1 \(pid (\d+)\) listening", 10, mark)
    assert [chat(proxy.port, "gpt-4o-mini") for _ in range(4)] == [200] * 4
    for pid in (proxy.workers[0], int(found.group(1))):
        memory = _memory_mib(pid)
        own = memory["Private_Clean"] + memory["Private_Dirty"]
        assert memory["Shared_Dirty"] > 25, memory  # the supervisor's pages, never copied
        assert own < memory["Shared_Dirty"], memory
    assert proxy.stop() == 0
