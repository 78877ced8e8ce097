"""Virtual keys on the command line, as a user runs them (subprocesses).

``llmproxy keys hash`` / ``keys new``, the open-relay warning of ``serve``
on a non-loopback address, and a served auth config whose stderr never
shows a key (the plaintext-key warning included).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llmproxy.filters.auth import AuthFactory
from llmproxy.runtime.app import is_loopback, open_relay_warning

from .test_cli_and_plugins import ROOT, _cli, _free_port, _wait_healthy

KEY = "sk-test-cli-7c1e55d0aa"
PLAIN = "sk-test-plain-93bd01"


def test_keys_hash_from_argument_and_stdin() -> None:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    expected = f'key_hash: "sha256:{digest}"\nkey_id: vk-{digest[:8]}\n'
    by_arg = _cli("keys", "hash", KEY)
    assert (by_arg.returncode, by_arg.stdout) == (0, expected)
    for args in (("keys", "hash", "-"), ("keys", "hash")):
        by_stdin = subprocess.run(
            [sys.executable, "-m", "llmproxy", *args], input=KEY + "\n", capture_output=True, text=True, cwd=ROOT
        )
        assert (by_stdin.returncode, by_stdin.stdout) == (0, expected)
        assert KEY not in by_stdin.stdout + by_stdin.stderr


def test_keys_hash_refuses_an_empty_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmproxy", "keys", "hash", "-"], input="\n", capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and "the key is empty" in result.stderr


def test_keys_new_prints_a_fresh_key_and_its_hash() -> None:
    first, second = _cli("keys", "new"), _cli("keys", "new")
    assert first.returncode == 0
    lines = dict(line.split(": ", 1) for line in first.stdout.splitlines())
    assert lines["key"].startswith("sk-") and len(lines["key"]) >= 40
    digest = hashlib.sha256(lines["key"].encode()).hexdigest()
    assert lines["key_hash"] == f'"sha256:{digest}"' and lines["key_id"] == f"vk-{digest[:8]}"
    assert first.stdout != second.stdout


def test_keys_help_is_listed() -> None:
    assert "keys" in _cli("--help").stdout
    result = _cli("keys", "--help")
    assert result.returncode == 0 and "hash" in result.stdout and "new" in result.stdout


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("proxy.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_relay_warning_needs_an_authenticating_filter() -> None:
    warning = open_relay_warning("0.0.0.0", 8080, [])
    assert warning is not None and warning.startswith(
        "open relay: no auth filter; anyone who can reach 0.0.0.0:8080 spends your provider keys"
    )
    assert open_relay_warning("127.0.0.1", 8080, []) is None
    assert AuthFactory.authenticates is True
    assert open_relay_warning("0.0.0.0", 8080, [object.__new__(AuthFactory)]) is None


def _serve(config: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "-c", str(config), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    _wait_healthy(port, proc)
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    return stderr


_MOCK_CHAIN = """
mock_upstreams: [{name: m}]
filters:
{auth}
  - name: routing
    config:
      providers:
        - {name: p, type: openai, base_url: "mock://m/v1", keys: [sk-provider-xyz-1], models: {demo: mock-gpt}}
"""


@pytest.mark.parametrize(
    ("host", "auth", "warned"),
    [
        ("0.0.0.0", "", True),
        ("127.0.0.1", "", False),
        ("0.0.0.0", f"  - {{name: auth, config: {{keys: [{{name: a, key: {PLAIN}}}]}}}}", False),
    ],
    ids=["public-no-auth", "loopback-no-auth", "public-with-auth"],
)
def test_serve_warns_about_an_open_relay(tmp_path: Path, host: str, auth: str, warned: bool) -> None:
    config = tmp_path / "conf.yaml"
    config.write_text(_MOCK_CHAIN.replace("{auth}", auth))
    proc, port = _serve(config, "--host", host)
    stderr = _stop(proc)
    assert ("open relay: no auth filter" in stderr) is warned, stderr
    if warned:
        assert f"anyone who can reach {host}:{port} spends your provider keys" in stderr
        assert stderr.count("open relay") == 1


def test_served_auth_never_logs_a_key(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(json.dumps({"keys": [{"name": "fromfile", "key": KEY}]}))
    auth = f"  - {{name: auth, config: {{keys: [{{name: plain, key: {PLAIN}}}], keys_file: keys.yaml}}}}"
    config = tmp_path / "conf.yaml"
    config.write_text(_MOCK_CHAIN.replace("{auth}", auth))
    proc, port = _serve(config, "--log-level", "debug")
    try:
        statuses = []
        for key in (PLAIN, KEY, "sk-test-unknown-0001", ""):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions?api_key={key}",
                data=b'{"model":"demo","messages":[{"role":"user","content":"hi"}]}',
                headers={"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})},
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    statuses.append(resp.status)
            except urllib.error.HTTPError as err:
                statuses.append(err.code)
    finally:
        stderr = _stop(proc)
    assert statuses == [200, 200, 401, 401]
    assert "principal=plain" in stderr and "principal=fromfile" in stderr and "principal=-" in stderr
    assert stderr.count("given in plaintext") == 1 and "'plain', 'fromfile'" in stderr
    for secret in (PLAIN, KEY, "sk-test-unknown-0001"):
        assert secret not in stderr


def test_the_auth_example_serves_offline() -> None:
    proc, port = _serve(ROOT / "conf" / "auth.example.yaml")
    statuses = {}
    try:
        for who, key, model in (
            ("alice", "sk-demo-alice", "demo-claude"),
            ("bob", "sk-demo-bob", "demo"),
            ("bob-claude", "sk-demo-bob", "demo-claude"),
            ("nobody", "sk-demo-nobody", "demo"),
        ):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode(),
                headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    statuses[who] = resp.status
            except urllib.error.HTTPError as err:
                statuses[who] = err.code
    finally:
        _stop(proc)
    assert statuses == {"alice": 200, "bob": 200, "bob-claude": 403, "nobody": 401}
