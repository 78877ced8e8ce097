"""The CLI and third-party filter plugins, as a user runs them (subprocesses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def _wait_healthy(port: int, proc: subprocess.Popen[str]) -> None:
    wait_healthy(port, proc, lambda: proc.stderr.read() if proc.stderr else "")


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Build and install (into a private target dir) a filter distribution with an entry point."""
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "llmproxy_stamp").mkdir()
    (src / "llmproxy_stamp" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from llmproxy import Action, Filter, FilterFactory

            class StampFilter(Filter):
                def on_response_headers(self, exchange):
                    exchange.response.headers.set("x-stamp", self.factory.config.get("value", "stamped"))
                    return Action.CONTINUE

            class StampFactory(FilterFactory):
                filter_class = StampFilter
            """
        )
    )
    (src / "llmproxy_broken.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    (src / "setup.cfg").write_text(
        textwrap.dedent(
            """
            [metadata]
            name = llmproxy-stamp
            version = 1.2.3

            [options]
            packages = llmproxy_stamp
            py_modules = llmproxy_broken

            [options.entry_points]
            llmproxy.filters =
                stamp = llmproxy_stamp:StampFactory
                broken = llmproxy_broken:Factory
            """
        )
    )
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield str(target)


def _env(plugin_path: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([plugin_path, str(ROOT)])
    return env


def test_filters_lists_builtin_and_plugin(plugin_path: str) -> None:
    out = _cli("filters", env=_env(plugin_path))
    assert out.returncode == 0, out.stderr
    assert "headers" in out.stdout and "llmproxy.filters.headers:HeadersFilterFactory" in out.stdout
    assert "stamp" in out.stdout and "llmproxy-stamp 1.2.3" in out.stdout


def test_check_reports_missing_and_broken_plugins(plugin_path: str, tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("filters:\n  - name: nope\n")
    out = _cli("check", "-c", str(conf), env=_env(plugin_path))
    assert out.returncode != 0
    assert f"{conf}: filters[0].name: filter 'nope': not installed" in out.stderr
    conf.write_text("filters:\n  - name: broken\n")
    out = _cli("check", "-c", str(conf), env=_env(plugin_path))
    assert out.returncode != 0
    assert "filter 'broken': cannot be loaded" in out.stderr and "broken on purpose" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_ok_and_bad_field(tmp_path: Path) -> None:
    out = _cli("check", "-c", str(ROOT / "conf" / "quickstart.yaml"))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    conf = tmp_path / "bad.yaml"
    conf.write_text("limits:\n  max_body_bytes: lots\n")
    out = _cli("check", "-c", str(conf))
    assert out.returncode != 0
    assert f"{conf}: limits.max_body_bytes: must be an integer" in out.stderr


def test_plugin_runs_in_chain_and_sigterm_drains(plugin_path: str, tmp_path: Path) -> None:
    port = _free_port()
    conf = tmp_path / "c.yaml"
    conf.write_text(
        textwrap.dedent(
            """
            mock_upstreams:
              - name: m
                itl: 0.02
            upstream:
              url: mock://m
            filters:
              - name: stamp
                config: {value: from-plugin}
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "-c", str(conf), "--port", str(port), "--log-level", "warning"],
        env=_env(plugin_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_healthy(port, proc)
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json", "x-mock-tokens": "30"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["x-stamp"] == "from-plugin"
            first = resp.read(10)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still finish
            rest = resp.read()
        assert first and b"[DONE]" in rest
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_quickstart_serves_offline(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "-c", str(ROOT / "conf" / "quickstart.yaml"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        _wait_healthy(port, proc)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=b'{"model":"quickstart-gpt","messages":[{"role":"user","content":"hi"}]}',
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and b"chat.completion" in resp.read()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("limits:\n  max_body_bytes: lots\n", "limits.max_body_bytes: must be an integer"),
        (
            "filters:\n  - name: headers\n    config: {request: {sett: {}}}\n",
            "filters[0].config: filter 'headers': request.sett: unknown key",
        ),
        ("server:\n  port: 1\n  port: 2\n", "duplicate key 'port'"),
        ("server:\n  admin_allow: [localhost]\n", "server.admin_allow: entry 0"),
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_invalid_config_exits_1_with_file_field_and_reason(tmp_path: Path, text: str, field: str, command: str) -> None:
    """Core and filter mistakes alike: exit code 1, one ``file: field: reason`` line, no traceback."""
    conf = tmp_path / "bad.yaml"
    conf.write_text(text)
    out = _cli(command, "-c", str(conf), "--port", "0") if command == "serve" else _cli(command, "-c", str(conf))
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert f"{conf}: " in out.stderr and field in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
