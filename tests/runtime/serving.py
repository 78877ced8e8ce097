"""Run ``llmproxy serve`` as a real process (supervisor and workers) for the operations tests.

:class:`Served` reads the process's log (stderr) in a thread, so a test can
wait for a log line with a deadline (never a fixed sleep as the assertion),
knows the workers' pids from their ``listening`` lines, and checks at the end
that no process of the instance is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

_LISTENING = re.compile(r"worker (\d+) \(pid (\d+)\) listening")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def processes_with(arg: str) -> list[int]:
    """Pids of live processes whose command line has ``arg`` (forked workers share the supervisor's)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in args and alive(int(entry)):
            found.append(int(entry))
    return found


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Served:
    """One ``llmproxy serve`` process and its log."""

    def __init__(self, config: Path, port: int, *args: str, log_level: str = "info") -> None:
        self.config = str(config)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmproxy",
                "serve",
                "-c",
                str(config),
                "--port",
                str(port),
                "--log-level",
                log_level,
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.workers: dict[int, int] = {}  # worker id -> pid of its newest process
        self.all_pids: set[int] = set()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
                found = _LISTENING.search(line)
                if found:
                    self.workers[int(found.group(1))] = int(found.group(2))
                    self.all_pids.add(int(found.group(2)))

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match[str]:
        """The first log line (from line ``after`` on) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.lines[after:]:
                    found = regex.search(line)
                    if found:
                        return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}; log:\n{self.log()}")

    def mark(self) -> int:
        """The number of log lines so far (for :meth:`wait_log`'s ``after``)."""
        with self._lock:
            return len(self.lines)

    def wait_ready(self, workers: int = 1, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            with self._lock:
                if len(self.workers) < workers:
                    return False
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout, "the proxy to serve")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for the exit; the exit code. Every worker must be gone too."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        wait_for(lambda: not processes_with(self.config), 10, "every process of the instance to exit")
        return code

    def kill_all(self) -> None:
        """Cleanup after a failed test: no process of this instance survives."""
        for pid in processes_with(self.config):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(5)
