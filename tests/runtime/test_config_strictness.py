"""Each config mistake an operator makes is refused by ``llmproxy check``: exit 1 and ``file: field: reason``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROVIDERS = """
filters:
  - name: routing
    config:
      providers:
        - name: oa
          type: openai
          base_url: http://127.0.0.1:9/v1
          keys: [{keys}]
          {extra}
          models: {{gpt-x: gpt-x-2025, "keep-*": ""}}
      aliases:
        smart:
          - {{provider: oa, model: {alias_model}}}
"""


def routing(keys: str = "sk-test", extra: str = "", alias_model: str = "gpt-x-2025") -> str:
    return PROVIDERS.format(keys=keys, extra=extra, alias_model=alias_model)


MISTAKES = [
    pytest.param(
        routing(keys='"${OPS_TEST_SURELY_UNSET:-}"'),
        "filters[0].config: filter 'routing': providers[0].keys: provider 'oa' has no key",
        id="provider-without-key",
    ),
    pytest.param(
        routing(keys='"${OPS_TEST_SURELY_UNSET}"'),
        "filters[0].config.providers[0].keys[0]: environment variable OPS_TEST_SURELY_UNSET is not set",
        id="provider-key-variable-unset",
    ),
    pytest.param(
        routing(alias_model="gpt-typo"),
        "filters[0].config: filter 'routing': aliases.smart[0].model: provider 'oa' does not serve 'gpt-typo'",
        id="alias-model-nobody-serves",
    ),
    pytest.param(
        "server:\n  port: 8080\nserver:\n  port: 8081\n",
        ": invalid YAML: line 3, column 1: duplicate key 'server' (first at line 1)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        "server:\n  admin_allow: [10.0.0.0/8, not-an-ip]\n",
        "server.admin_allow: entry 1 ('not-an-ip') is not an IP address or CIDR network",
        id="admin-allow-not-an-ip",
    ),
    pytest.param("server:\n  workers: lots\n", "server.workers: must be an integer", id="workers-not-a-number"),
    pytest.param("server:\n  pid_file: ''\n", "server.pid_file: must not be empty", id="pid-file-empty"),
]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", "-c", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(("text", "message"), MISTAKES)
def test_each_mistake_is_refused_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    done = check(path)
    assert done.returncode == 1, done.stdout
    assert f"Error: {path}{'' if message.startswith(':') else ': '}{message}" in done.stderr


def test_the_correct_versions_pass(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for text in (
        routing(),
        routing(alias_model="keep-anything"),  # covered by a kept-name pattern
        routing(alias_model="gpt-x"),  # an exact client name
        routing(keys='"${OPS_TEST_SURELY_UNSET:-}"', extra="needs_key: false"),  # a local server
        "server:\n  workers: auto\n  admin_allow: [10.0.0.0/8, '::1']\n  pid_file: /tmp/x.pid\n",
    ):
        path.write_text(text)
        done = check(path)
        assert done.returncode == 0, (text, done.stderr)
