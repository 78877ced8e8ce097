"""A throwaway ``redis-server`` for tests: started on a free loopback port, killed after.

Use :func:`start_redis_server` / :func:`stop_redis_server` directly when a test
must control the server's life (restart it, say), or the session-scoped
:func:`redis_url` fixture for a shared server. Import the fixture into the
test module (``from .redis_server import redis_url``) to use it; tests that
share the server should use their own key namespace instead of flushing.
The fixture skips when ``redis-server`` is not on PATH.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

__all__ = ["free_port", "redis_url", "start_redis_server", "stop_redis_server"]

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = "redis-server is not on PATH (install Debian's redis-server to run the Redis tests)"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (nothing listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(port: int | None = None, *, timeout: float = 5.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``redis-server`` on ``127.0.0.1:port`` (a free one by default) without persistence.

    Returns ``(process, url)`` once the server answers PING; raises
    RuntimeError (after killing it) if it does not within ``timeout``.
    Pass the same ``port`` again to restart a stopped server in place.
    """
    if REDIS_SERVER is None:
        raise RuntimeError(SKIP_REASON)
    if port is None:  # another process may take a free port first: try a few
        for _ in range(2):
            try:
                return _start(REDIS_SERVER, free_port(), timeout)
            except RuntimeError:
                pass
        port = free_port()
    return _start(REDIS_SERVER, port, timeout)


def _start(binary: str, port: int, timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", tempfile.gettempdir(), "--loglevel", "warning"]
    with tempfile.TemporaryFile() as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers_ping(port):
                return proc, f"redis://127.0.0.1:{port}/0"
            time.sleep(0.02)
        stop_redis_server(proc)
        log.seek(0)
        output = log.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server on port {port} did not answer PING (exit {proc.returncode}): {output}")


def stop_redis_server(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` and reap it; a no-op if it already exited."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a redis-server shared by the session; skips if redis-server is missing."""
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    proc, url = start_redis_server()
    yield url
    stop_redis_server(proc)
