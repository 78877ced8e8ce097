"""The mock provider is reached only through the ``llmproxy.mock_upstream`` hook (:mod:`llmproxy.runtime.mock_hook`).

The runtime (config, app, cli, the filter API) never imports :mod:`llmproxy.mock`
statically; the hook is loaded when, and only when, a config has
``mock_upstreams``, validates each entry (``file: mock_upstreams[i]: field:
reason``) and starts the servers; a hook that cannot be loaded is a config
error naming it, never a traceback.
"""

from __future__ import annotations

import ast
import configparser
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import llmproxy.runtime.mock_hook as mock_hook
from llmproxy.mock import MockHook, MockServer
from llmproxy.runtime.cli import main as cli_main
from llmproxy.runtime.config import ConfigError, parse_config

from ..support import RunningProxy

ROOT = Path(__file__).resolve().parents[2]
GROUP = mock_hook.ENTRY_POINT_GROUP


class RecordingHook:
    """A hook that records what the runtime asks of it and delegates to :class:`MockHook`."""

    calls: list[tuple[str, Any]] = []

    @staticmethod
    def validate(options: Mapping[str, Any]) -> None:
        RecordingHook.calls.append(("validate", dict(options)))
        if "colour" in options:
            raise ValueError("colour: this hook has no colours")
        MockHook.validate({k: v for k, v in options.items() if k != "label"})

    @staticmethod
    async def start(host: str, port: int, options: Mapping[str, Any]) -> MockServer:
        RecordingHook.calls.append(("start", (host, port, dict(options))))
        return await MockHook.start(host, port, {k: v for k, v in options.items() if k != "label"})

    @staticmethod
    def serve(host: str, port: int, options: Mapping[str, Any]) -> None:
        RecordingHook.calls.append(("serve", (host, port, dict(options))))


NOT_A_HOOK = object()


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[list[EntryPoint]], None]]:
    """Replace the installed entry points of the hook group (the loader's one seam)."""

    def register(eps: list[EntryPoint]) -> None:
        def fake(*, group: str) -> Iterable[EntryPoint]:
            assert group == GROUP
            return eps

        monkeypatch.setattr(mock_hook, "entry_points", fake)

    RecordingHook.calls = []
    yield register
    RecordingHook.calls = []


def _ep(value: str, name: str = "mock") -> EntryPoint:
    return EntryPoint(name=name, value=value, group=GROUP)


# -- the runtime never imports the mock statically ------------------------------


def _runtime_modules() -> list[Path]:
    files = sorted((ROOT / "proxy").rglob("*.py")) + sorted((ROOT / "filters").rglob("*.py"))
    return [f for f in files if (ROOT / "proxy" / "mock") not in f.parents]


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), TYPE_CHECKING ones included."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])  # an __init__ is in its own package too
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", _runtime_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_module_never_imports_the_mock(path: Path) -> None:
    bad = sorted(m for m in _imported(path) if m == "llmproxy.mock" or m.startswith("llmproxy.mock."))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: reach the mock through llmproxy.runtime.mock_hook"


_PROBE = """
import json, sys
import llmproxy, llmproxy.filter, llmproxy.testing, llmproxy.filters.routing
import llmproxy.runtime.app, llmproxy.runtime.cli, llmproxy.runtime.config, llmproxy.runtime.plugins
from llmproxy.runtime.config import parse_config
parse_config({"upstream": {"url": "http://127.0.0.1:9/v1"}}, "plain.yaml")
before = sorted(m for m in sys.modules if m == "llmproxy.mock" or m.startswith("llmproxy.mock."))
parse_config({"mock_upstreams": [{"name": "m"}], "upstream": {"url": "mock://m"}}, "mocked.yaml")
print(json.dumps([before, "llmproxy.mock" in sys.modules]))
"""


def test_mock_is_loaded_only_for_a_config_with_mock_upstreams() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout)
    assert before == [], f"the runtime imported {before} without mock_upstreams"
    assert after is True


# -- loading the hook -----------------------------------------------------------


@pytest.mark.parametrize(
    ("eps", "expected"),
    [
        ([], MockHook),  # no metadata for the group (an older install): the fallback by name
        ([_ep("llmproxy.mock:MockHook")], MockHook),
        ([_ep("nope:X", name="other"), _ep("tests.mock.test_mock_hook:RecordingHook")], RecordingHook),
    ],
    ids=["fallback", "registered", "by-name"],
)
def test_hook_is_loaded_from_the_entry_point_group(
    registered: Callable[[list[EntryPoint]], None], eps: list[EntryPoint], expected: object
) -> None:
    registered(eps)
    assert mock_hook.load_mock_hook() is expected


BROKEN_HOOKS = [
    (
        "no_such_module_for_mock_hook:Hook",
        "cannot be loaded from no_such_module_for_mock_hook:Hook: ModuleNotFoundError",
    ),
    ("llmproxy.mock:NoSuchHook", "cannot be loaded from llmproxy.mock:NoSuchHook: AttributeError"),
    ("llmproxy.mock:MockConfig", "mock upstream hook llmproxy.mock:MockConfig has no validate, start, serve"),
    ("tests.mock.test_mock_hook:NOT_A_HOOK", "has no validate, start, serve"),
]


@pytest.mark.parametrize(("value", "reason"), BROKEN_HOOKS)
def test_unusable_hook_is_an_error_naming_it(
    registered: Callable[[list[EntryPoint]], None], value: str, reason: str
) -> None:
    registered([_ep(value)])
    with pytest.raises(mock_hook.MockHookError, match=reason):
        mock_hook.load_mock_hook()


@pytest.mark.parametrize(("value", "reason"), BROKEN_HOOKS)
def test_unusable_hook_is_a_config_error_only_with_mock_upstreams(
    registered: Callable[[list[EntryPoint]], None], value: str, reason: str
) -> None:
    registered([_ep(value)])
    parse_config({"upstream": {"url": "http://127.0.0.1:9/v1"}}, "plain.yaml")  # never asks for the hook
    with pytest.raises(ConfigError) as info:
        parse_config({"mock_upstreams": [{"name": "m"}]}, "c.yaml")
    assert info.value.path == "mock_upstreams[0]"
    assert reason in info.value.reason
    assert str(info.value).startswith("c.yaml: mock_upstreams[0]: mock upstream hook")


def test_setup_cfg_registers_the_hook_the_loader_falls_back_to() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"][GROUP].strip().splitlines()]
    assert lines == [f"{mock_hook.ENTRY_POINT_NAME} = {mock_hook.FALLBACK}"]


# -- the hook validates and starts --------------------------------------------------


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"tokens": "many"}, "tokens: expected an integer 0..100000, got 'many'"),
        ({"tokens": 100_001}, "tokens: expected an integer 0..100000"),
        ({"itl": -1}, "itl: expected a number >= 0, got -1"),
        ({"ttft": True}, "ttft: expected a number >= 0, got True"),
        ({"require_key": "yes"}, "require_key: expected true or false"),
        ({"valid_keys": ["ok", ""]}, "valid_keys: expected a list of non-empty strings"),
        ({"keys": {"sk-a": {"times": -1}}}, "keys.sk-a.times: expected an integer >= 0, got -1"),
        ({"keys": {"sk-a": {"fault": "explode"}}}, "keys.sk-a.fault: expected one of"),
        ({"keys": {"sk-a": {"colour": 1}}}, "keys.sk-a.colour: unknown field"),
        ({"colour": "red"}, "colour: unknown mock config field"),
    ],
)
def test_mock_options_are_validated_by_the_hook(options: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match="^" + reason.replace("(", r"\(").replace(".", r"\.")):
        MockHook.validate(options)
    with pytest.raises(ConfigError) as info:
        parse_config({"mock_upstreams": [{"name": "ok"}, {"name": "m", "port": 0, **options}]}, "c.yaml")
    assert str(info.value).startswith(f"c.yaml: mock_upstreams[1]: {reason}")


def test_config_validation_goes_through_the_registered_hook(registered: Callable[[list[EntryPoint]], None]) -> None:
    registered([_ep("tests.mock.test_mock_hook:RecordingHook")])
    with pytest.raises(ConfigError, match=r"^c\.yaml: mock_upstreams\[0\]: colour: this hook has no colours$"):
        parse_config({"mock_upstreams": [{"name": "m", "colour": "red"}]}, "c.yaml")
    assert RecordingHook.calls == [("validate", {"colour": "red"})]


def test_proxy_starts_its_mocks_through_the_hook(
    registered: Callable[[list[EntryPoint]], None], make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    registered([_ep("tests.mock.test_mock_hook:RecordingHook")])
    running = make_proxy(
        {"mock_upstreams": [{"name": "m", "tokens": 3, "label": "x"}], "upstream": {"url": "mock://m"}}
    )
    assert RecordingHook.calls == [
        ("validate", {"tokens": 3, "label": "x"}),
        ("start", ("127.0.0.1", 0, {"tokens": 3, "label": "x"})),
    ]
    req = urllib.request.Request(
        f"{running.url}/v1/chat/completions",
        data=b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["choices"][0]["message"]["content"] == "lorem ipsum dolor "


# -- the mock-upstream command ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--ttft-ms", "-1"], "ttft: expected a number >= 0"),
        (["--itl-ms", "-5"], "itl: expected a number >= 0"),
        (["--tokens", "100001"], "tokens: expected an integer 0..100000"),
    ],
)
def test_mock_upstream_command_rejects_bad_options_without_a_traceback(args: list[str], reason: str) -> None:
    result = CliRunner().invoke(cli_main, ["mock-upstream", "--port", "0", *args])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"Error: {reason}" in result.output


def test_mock_upstream_command_serves_through_the_hook(registered: Callable[[list[EntryPoint]], None]) -> None:
    registered([_ep("tests.mock.test_mock_hook:RecordingHook")])
    result = CliRunner().invoke(cli_main, ["mock-upstream", "--port", "0", "--tokens", "5", "--provider-headers"])
    assert result.exit_code == 0, result.output
    options = {"tokens": 5, "ttft": 0.0, "itl": 0.0, "provider_headers": True}
    assert RecordingHook.calls == [("validate", options), ("serve", ("127.0.0.1", 0, options))]
