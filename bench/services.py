"""The processes under test: the mock provider, llmproxy and the baselines, started pinned to CPUs.

The mock and llmproxy run as ``python -m proxy ...`` with the interpreter
running the bench, so the bench measures the checkout it sits in. The
baselines are reference relays in front of the same mock: ``h11relay.py``
(a bare uvloop + h11 proxy) and nginx with a generated config. Output goes
to a log file whose tail is shown if a process fails to start or dies.
Ports are picked free by binding to port 0 first (the usual small race,
fine on loopback).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from procstat import ProcessTree

__all__ = [
    "Service",
    "find_nginx",
    "free_port",
    "http_status",
    "nginx_version",
    "pin_prefix",
    "start_h11relay",
    "start_mock",
    "start_nginx",
    "start_otlp_sink",
    "start_proxy",
    "start_redis",
]

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_ENV = "LLMPROXY_BENCH_UPSTREAM"
H11RELAY = Path(__file__).resolve().with_name("h11relay.py")
OTLP_SINK = Path(__file__).resolve().with_name("otlpsink.py")
#: Set for every proxy when the bench started them: the OTLP sink's traces URL, the Redis URL.
OTLP_ENV = "LLMPROXY_BENCH_OTLP"
REDIS_ENV = "LLMPROXY_BENCH_REDIS"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pin_prefix(cpus: Sequence[int] | None) -> list[str]:
    """``taskset -c CPUS`` when pinning is asked for and taskset exists, else nothing."""
    if not cpus or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", ",".join(str(c) for c in cpus)]


def http_status(host: str, port: int, path: str, timeout: float = 1.0) -> int:
    """Status code of ``GET path`` (0 if the connection fails)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
            head = sock.recv(64)
    except OSError:
        return 0
    try:
        return int(head[9:12])
    except ValueError:
        return 0


class Service:
    """A started process, its port and its log."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], host: str, port: int, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.host = host
        self.port = port
        self.log = log
        self.extra_logs: list[Path] = []  # logs the process writes itself (nginx's error_log)
        self.tree = ProcessTree(proc.pid)

    def __repr__(self) -> str:
        return f"<Service {self.name} pid={self.proc.pid} port={self.port}>"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of each log (stdout and stderr, then any extra log)."""
        tails = []
        for path in [self.log, *self.extra_logs]:
            try:
                tails += path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
        return "\n".join(tails)

    def wait_ready(self, path: str, timeout: float = 20.0) -> None:
        """Poll ``GET path`` until 200; raise with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if http_status(self.host, self.port, path) == 200:
                self.tree.discover()
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready on {self.url}{path} after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL (workers too) after ``timeout``; returns the exit code."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.tree.workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()
        return proc.returncode


def _spawn(name: str, cmd: list[str], host: str, port: int, logdir: Path, env: dict[str, str]) -> Service:
    log = logdir / f"{name.replace('/', '_')}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return Service(name, proc, host, port, log)


def start_mock(
    *,
    host: str,
    port: int,
    tokens: int,
    cpus: Sequence[int] | None,
    logdir: Path,
    timeout: float = 20.0,
    provider_headers: bool = False,
) -> Service:
    """The mock provider in its fastest mode (no pacing, no faults), ready to serve."""
    port = port or free_port(host)
    cmd = [*pin_prefix(cpus), sys.executable, "-m", "llmproxy", "mock-upstream"]
    cmd += ["--host", host, "--port", str(port), "--tokens", str(tokens)]
    if provider_headers:
        cmd.append("--provider-headers")
    return _ready(_spawn("mock", cmd, host, port, logdir, dict(os.environ)), "/_mock/health", timeout)


def start_proxy(
    name: str,
    config: Path,
    *,
    upstream: str,
    workers: int,
    cpus: Sequence[int] | None,
    logdir: Path,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    env_extra: dict[str, str] | None = None,
) -> Service:
    """``llmproxy serve -c config`` with ``$LLMPROXY_BENCH_UPSTREAM`` set to ``upstream``, ready to serve.

    ``env_extra`` adds variables (the OTLP sink's and Redis's URLs) the config may refer to.
    """
    port = free_port(host)
    cmd = [*pin_prefix(cpus), sys.executable, "-m", "llmproxy", "serve", "-c", str(config)]
    cmd += ["--host", host, "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    env = {**os.environ, **(env_extra or {}), UPSTREAM_ENV: upstream}
    svc = _spawn(name, cmd, host, port, logdir, env)
    try:
        svc.wait_ready("/healthz", timeout)
        if workers > 1:  # workers bind one after another; wait until all of them are up
            deadline = time.monotonic() + timeout
            while len(svc.tree.workers) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
                svc.tree.discover()
    except BaseException:
        svc.stop()
        raise
    return svc


def _ready(svc: Service, path: str, timeout: float) -> Service:
    """Wait until ``svc`` answers ``path`` with 200; stop it and re-raise if it does not."""
    try:
        svc.wait_ready(path, timeout)
    except BaseException:
        svc.stop()
        raise
    return svc


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ValueError(f"{url}: expected http://host:port")
    return parts.hostname, parts.port


def start_otlp_sink(*, cpus: Sequence[int] | None, logdir: Path, host: str = "127.0.0.1") -> Service:
    """``bench/otlpsink.py`` on a free port, ready: traces go to ``{url}/v1/traces``, counts at ``/stats``."""
    port = free_port(host)
    cmd = [*pin_prefix(cpus), sys.executable, str(OTLP_SINK), "--host", host, "--port", str(port)]
    return _ready(_spawn("otlp-sink", cmd, host, port, logdir, dict(os.environ)), "/health", 20.0)


def start_redis(*, cpus: Sequence[int] | None, logdir: Path, host: str = "127.0.0.1") -> Service | None:
    """``redis-server`` on a free port without persistence, ready; None if it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port(host)
    cmd = [*pin_prefix(cpus), binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]
    svc = _spawn("redis", cmd, host, port, logdir, dict(os.environ))
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    svc.tree.discover()
                    return svc
        except OSError:
            pass
        if svc.proc.poll() is not None:
            break
        time.sleep(0.05)
    svc.stop()
    raise RuntimeError(f"redis-server not ready on {host}:{port}:\n{svc.log_tail()}")


def start_h11relay(
    name: str,
    *,
    upstream: str,
    cpus: Sequence[int] | None,
    logdir: Path,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
) -> Service:
    """``bench/h11relay.py`` in front of ``upstream`` (the mock's URL), ready to serve."""
    port = free_port(host)
    up_host, up_port = _host_port(upstream)
    cmd = [*pin_prefix(cpus), sys.executable, str(H11RELAY), "--host", host, "--port", str(port)]
    cmd += ["--upstream", f"{up_host}:{up_port}"]
    return _ready(_spawn(name, cmd, host, port, logdir, dict(os.environ)), "/_mock/health", timeout)


def find_nginx() -> str | None:
    """Path of the ``nginx`` binary (``$PATH``, then ``/usr/sbin/nginx``), or None."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def nginx_version(nginx: str) -> str:
    """``nginx/1.22.1`` (nginx prints its version on stderr)."""
    proc = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (proc.stderr or proc.stdout).strip().rpartition(": ")[2] or "nginx"


# One worker (the counterpart of one llmproxy process on one CPU), no access log,
# upstream keep-alive, streamed responses. Temp paths and the pid file go to the
# bench's directory so nginx needs nothing from /var. keepalive_requests is raised
# so that neither side closes a connection every 1000 requests (nginx's default).
_NGINX_CONF = """\
worker_processes 1;
daemon off;
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream mock {{
        server {up_host}:{up_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_nginx(
    name: str,
    nginx: str,
    *,
    upstream: str,
    cpus: Sequence[int] | None,
    logdir: Path,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
) -> Service:
    """nginx (one worker) as a reverse proxy in front of ``upstream``, ready to serve.

    The config, pid file, temp paths and ``error.log`` go to a fresh directory
    under ``logdir``; the error log is one of the service's logs.
    """
    port = free_port(host)
    up_host, up_port = _host_port(upstream)
    confdir = Path(tempfile.mkdtemp(prefix="nginx-", dir=logdir))
    # nginx started by root runs its worker as "nobody", which cannot enter this directory
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = confdir / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(user=user, dir=confdir, host=host, port=port, up_host=up_host, up_port=up_port))
    cmd = [*pin_prefix(cpus), nginx, "-p", str(confdir), "-c", str(conf)]
    svc = _spawn(name, cmd, host, port, logdir, dict(os.environ))
    svc.extra_logs.append(confdir / "error.log")
    return _ready(svc, "/_mock/health", timeout)
