"""Config loading: interpolation, strict validation, errors that name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmproxy.runtime.config import ConfigError, load_config, parse_config


def test_quickstart_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "conf" / "quickstart.yaml")
    assert cfg.mock_upstreams[0].name == "quickstart"
    assert [f.name for f in cfg.filters] == ["metering", "routing", "tracing", "headers"]


def test_interpolation() -> None:
    env = {"KEY": "sk-env", "PORT": "9100", "EMPTY": ""}
    cfg = parse_config(
        {
            "server": {"port": "${PORT}"},
            "upstream": {
                "url": "http://127.0.0.1:${UP_PORT:-9009}/v1",
                "headers": {"authorization": "Bearer ${KEY}", "x-dollar": "$${KEY}", "x-empty": "${EMPTY:-fallback}"},
            },
        },
        env=env,
    )
    assert cfg.server.port == 9100
    assert cfg.upstream is not None
    assert cfg.upstream.url == "http://127.0.0.1:9009/v1"
    assert dict(cfg.upstream.headers) == {"authorization": "Bearer sk-env", "x-dollar": "${KEY}", "x-empty": "fallback"}


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        ({"servr": {}}, "servr", "unknown key"),
        ({"server": {"prot": 1}}, "server.prot", "unknown key"),
        ({"server": {"port": 70000}}, "server.port", "port number"),
        ({"server": {"port": "abc"}}, "server.port", "must be an integer"),
        ({"server": {"workers": 0}}, "server.workers", "between 1 and 256"),
        ({"server": {"access_log": "yes"}}, "server.access_log", "must be one of"),
        ({"server": {"listen": "both"}}, "server.listen", "must be one of"),
        ({"server": {"admin_allow": ["localhost"]}}, "server.admin_allow", "entry 0 ('localhost') is not an IP"),
        ({"server": {"admin_allow": ["::1", "10.0.0.0/33"]}}, "server.admin_allow", "entry 1 ('10.0.0.0/33')"),
        ({"limits": {"max_body_bytes": -1}}, "limits.max_body_bytes", "greater than 0"),
        ({"limits": {"header_timeout": True}}, "limits.header_timeout", "not a boolean"),
        ({"upstream": {"url": "ftp://x"}}, "upstream.url", "http://"),
        ({"upstream": {}}, "upstream.url", "is required"),
        ({"upstream": {"url": "http://x", "timeouts": {"idle": 0}}}, "upstream.timeouts.idle", "greater than 0"),
        ({"upstream": {"url": "http://x", "timeouts": {"idel": 1}}}, "upstream.timeouts.idel", "unknown key"),
        ({"upstream": {"url": "http://x", "headers": {"bad header": "v"}}}, "upstream.headers", "invalid header name"),
        ({"upstream": {"url": "mock://nope"}}, "upstream.url", "no mock_upstreams entry"),
        (
            {"upstream": {"url": "http://x", "headers": {"a": "${MISSING_VAR}"}}},
            "upstream.headers.a",
            "MISSING_VAR is not set",
        ),
        ({"store": "postgres://x"}, "store", "redis://"),
        ({"filters": [{"config": {}}]}, "filters[0].name", "is required"),
        ({"filters": [{"name": "x", "confg": {}}]}, "filters[0].confg", "unknown key"),
        ({"filters": "headers"}, "filters", "must be a list"),
        ({"mock_upstreams": [{"port": 1}]}, "mock_upstreams[0].name", "is required"),
        ({"mock_upstreams": [{"name": "m", "tokens": "many"}]}, "mock_upstreams[0]", "tokens"),
    ],
)
def test_bad_config_names_file_field_and_reason(raw: dict[str, object], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "bad.yaml", env={})
    message = str(info.value)
    assert message.startswith(f"bad.yaml: {path}: "), message
    assert reason in message, message


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("server:\n  port: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "line" in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/conf.yaml")
    assert "/nonexistent/conf.yaml" in str(info.value)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("server:\n  port: 1\n  port: 2\n", "line 3"),
        ("server: {}\nfilters: []\nserver: {}\n", "line 3"),
        ("filters:\n  - name: headers\n    config: {}\n    name: routing\n", "line 4"),
    ],
)
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "duplicate key" in message and where in message, message


def test_same_key_in_sibling_mappings_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("filters:\n  - name: headers\n    config: {}\n  - name: headers\n    config: {}\n")
    assert len(load_config(path).filters) == 2
