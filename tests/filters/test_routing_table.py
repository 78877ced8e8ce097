"""The routing table without sockets: model mapping, candidate order, config validation,
and the per-exchange filter driven through the harness.

End-to-end behaviour (SDKs, the mock provider, translation) is in
``test_routing.py`` and ``test_routing_golden_e2e.py``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy import Action, FactoryContext
from llmproxy.engine.chain import Chain
from llmproxy.exchange import Exchange
from llmproxy.filters.routing import ModelMap, RoutingFactory, RoutingFilter, RoutingTable, Target, key_id
from llmproxy.filters.routing.table import NoProvider, build_table
from llmproxy.runtime.config import ConfigError, parse_config
from llmproxy.runtime.plugins import build_chain
from llmproxy.state.store import MemoryStore
from llmproxy.testing import FilterHarness

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "providers.example.yaml"

# ---------------------------------------------------------------------------
# ModelMap
# ---------------------------------------------------------------------------

MAPPING = {
    "gpt-4o": "gpt-4o-2024-08-06",  # exact
    "gpt-4o-mini": "",  # exact, keeps the name
    "gpt-4*": "gpt-4-turbo",  # prefix
    "gpt-4o-*": "gpt-4o-dated",  # longer prefix wins over gpt-4*
    "claude-*": "",  # prefix, keeps the name
    "*": "fallback-model",  # anything else
}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "gpt-4o-2024-08-06"),  # exact beats the gpt-4o-* and gpt-4* prefixes
        ("gpt-4o-mini", "gpt-4o-mini"),  # exact with "" keeps the client's name
        ("gpt-4o-2024-05-13", "gpt-4o-dated"),  # longest prefix
        ("gpt-4-turbo-preview", "gpt-4-turbo"),  # shorter prefix
        ("gpt-4", "gpt-4-turbo"),  # a prefix matches the bare prefix too
        ("claude-sonnet-4-5", "claude-sonnet-4-5"),  # prefix with "" keeps the name
        ("llama-3", "fallback-model"),  # wildcard
        ("GPT-4O", "fallback-model"),  # case-sensitive
        ("", "fallback-model"),
    ],
)
def test_model_map_resolution_order(model: str, expected: str) -> None:
    assert ModelMap.parse(MAPPING, "models").resolve(model) == expected


@pytest.mark.parametrize(
    ("raw", "model", "expected"),
    [
        (["a", "b"], "a", "a"),  # a list serves its names as they are
        (["a", "b"], "c", None),
        ({"a": None}, "a", "a"),  # YAML `a:` (null) keeps the name
        ({"x*": "y"}, "x", "y"),
        ({"x*": "y"}, "w", None),  # no wildcard: not served
        ({"*": ""}, "anything", "anything"),  # serve every name as asked
        ({"*": "one"}, "anything", "one"),
    ],
)
def test_model_map_small_cases(raw: Any, model: str, expected: str | None) -> None:
    assert ModelMap.parse(raw, "models").resolve(model) == expected


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"a*b": "x"}, "models.a*b"),
        ({"*a": "x"}, "models.*a"),
        ({"a**": "x"}, "models.a**"),
        ({"a": 3}, "models.a"),
        ({"": "x"}, "models"),
        ({}, "models"),
        ([], "models"),
        (None, "models"),
        ("gpt-4o", "models"),
    ],
)
def test_model_map_rejects(raw: Any, field: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field) + ": "):
        ModelMap.parse(raw, "models")


def test_model_map_lists_only_exact_names() -> None:
    assert sorted(ModelMap.parse(MAPPING, "models").listed()) == ["gpt-4o", "gpt-4o-mini"]


# ---------------------------------------------------------------------------
# RoutingTable
# ---------------------------------------------------------------------------


def provider(name: str, kind: str = "openai", **extra: Any) -> dict[str, Any]:
    base = "http://127.0.0.1:9/v1" if kind != "anthropic" else "http://127.0.0.1:9"
    out: dict[str, Any] = {"name": name, "type": kind, "base_url": base, "keys": [f"sk-{name}"], "models": ["m"]}
    out.update(extra)
    return out


class ScriptedRandom(random.Random):
    """``random()`` returns the scripted values in order, then 0.0 (the table's only use of its rng)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0) if self.values else 0.0


class NoRandom(random.Random):
    def random(self) -> float:
        raise AssertionError("no draw expected")


def table(config: dict[str, Any], rng: random.Random | None = None) -> RoutingTable:
    built = build_table(config, {})
    return RoutingTable(list(built.providers.values()), built.aliases, rng=rng)


def order(targets: list[Any]) -> list[str]:
    return [f"{t.provider.name}:{t.model}" for t in targets]


THREE = {
    "providers": [provider("a", weight=3), provider("b", weight=1), provider("c", weight=4)],
}


@pytest.mark.parametrize(
    ("draws", "expected"),
    [
        # weights a=3, b=1, c=4 (total 8): a draw d picks the target whose cumulative weight exceeds d*total
        ([0.0, 0.0], ["a", "b", "c"]),
        ([0.374, 0.0], ["a", "b", "c"]),  # 2.99 < 3 -> a; then b=1, c=4: 0 -> b
        ([0.375, 0.0], ["b", "a", "c"]),  # 3.0 is past a -> b; then a=3, c=4: 0 -> a
        ([0.5, 0.99], ["c", "b", "a"]),  # 4.0 -> c; then a=3, b=1: 3.96 -> b
        ([0.999, 0.42], ["c", "a", "b"]),  # 7.99 -> c; then 1.68 -> a
    ],
)
def test_candidates_are_a_weighted_permutation(draws: list[float], expected: list[str]) -> None:
    got = table(THREE, ScriptedRandom(draws)).candidates("m", "chat")
    assert [t.provider.name for t in got] == expected
    assert [t.weight for t in got] == [{"a": 3.0, "b": 1.0, "c": 4.0}[n] for n in expected]


def test_candidates_first_choice_follows_weights() -> None:
    rt = table(THREE, random.Random(20240601))
    n = 40_000
    firsts = Counter(rt.candidates("m", "chat")[0].provider.name for _ in range(n))
    for name, weight in (("a", 3), ("b", 1), ("c", 4)):
        assert abs(firsts[name] / n - weight / 8) < 0.01, firsts


def test_candidates_fallback_order_follows_remaining_weights() -> None:
    rt = table(THREE, random.Random(7))
    seconds: Counter[str] = Counter()
    for _ in range(20_000):
        names = [t.provider.name for t in rt.candidates("m", "chat")]
        assert sorted(names) == ["a", "b", "c"]
        if names[0] == "c":
            seconds[names[1]] += 1
    total = sum(seconds.values())
    assert abs(seconds["a"] / total - 0.75) < 0.02, seconds  # a:b = 3:1 once c is taken


def test_single_candidate_does_not_draw() -> None:
    rt = table({"providers": [provider("only")]}, NoRandom())
    assert order(rt.candidates("m", "chat")) == ["only:m"]


def test_candidates_apply_each_providers_mapping() -> None:
    rt = table(
        {
            "providers": [
                provider("oa", models={"gpt-4o": "gpt-4o-2024-08-06", "gpt-*": ""}),
                provider("an", "anthropic", models={"*": "claude-haiku"}),
            ]
        },
        ScriptedRandom([0.0, 0.0]),
    )
    assert order(rt.candidates("gpt-4o", "chat")) == ["oa:gpt-4o-2024-08-06", "an:claude-haiku"]
    assert order(rt.candidates("gpt-5", "chat")) == ["oa:gpt-5", "an:claude-haiku"]
    assert order(rt.candidates("llama", "chat")) == ["an:claude-haiku"]


@pytest.mark.parametrize(
    ("api", "expected"),
    [
        ("chat", ["oa", "an"]),  # the anthropic provider serves chat by translation
        ("messages", ["oa", "an"]),  # and the openai one serves messages by translation
        ("embeddings", ["oa"]),
        ("completions", ["oa"]),
        ("responses", ["oa", "an"]),  # passed through to openai, bridged to anthropic
        ("count_tokens", ["an"]),
    ],
)
def test_candidates_only_providers_serving_the_api(api: str, expected: list[str]) -> None:
    rt = table({"providers": [provider("oa"), provider("an", "anthropic")]}, ScriptedRandom([0.0, 0.0]))
    assert [t.provider.name for t in rt.candidates("m", api)] == expected


def test_azure_serves_the_responses_api_by_bridging() -> None:
    rt = table({"providers": [provider("az", "azure")]})
    assert order(rt.candidates("m", "responses")) == ["az:m"]
    assert "responses" not in rt.providers["az"].adapter.native_apis


def test_native_responses_false_bridges_an_openai_provider() -> None:
    rt = table({"providers": [{**provider("oa"), "native_responses": False}]})
    assert order(rt.candidates("m", "responses")) == ["oa:m"]
    assert "responses" not in rt.providers["oa"].adapter.native_apis
    assert "chat" in rt.providers["oa"].adapter.native_apis
    with pytest.raises(ValueError, match=r"native_responses: must be true or false"):
        table({"providers": [{**provider("oa"), "native_responses": "no"}]})


def test_unknown_model_and_pin() -> None:
    rt = table({"providers": [provider("a"), provider("b", models=["other"])]}, ScriptedRandom([]))
    with pytest.raises(NoProvider) as info:
        rt.candidates("nope", "chat")
    assert info.value.reason == "unknown"
    assert order(rt.candidates("m", "chat", pin="a")) == ["a:m"]
    with pytest.raises(NoProvider) as info:
        rt.candidates("m", "chat", pin="b")  # b exists but does not serve m
    assert info.value.reason == "unknown"


@pytest.mark.parametrize("keys", [["", "  "], []])
def test_a_provider_left_without_a_key_is_refused(keys: list[str]) -> None:
    with pytest.raises(ValueError, match=r"providers\[0\]\.keys: provider 'keyless' has no key .*needs_key: false"):
        table({"providers": [provider("keyless", keys=keys), provider("keyed", models=["m", "n"])]})


def test_a_provider_that_needs_no_key_sends_none() -> None:
    rt = table({"providers": [provider("local", keys=[""], needs_key=False)]})
    (target,) = rt.candidates("m", "chat")
    assert target.provider.has_keys and target.provider.key_ids == ("",)
    assert not any(name == b"authorization" for name, _ in target.provider.targets[0].headers)
    with pytest.raises(ValueError, match=r"providers\[0\]\.needs_key: must be true or false"):
        table({"providers": [provider("local", needs_key="no")]})


@pytest.mark.parametrize(
    ("models", "alias_model", "ok"),
    [
        ({"claude-x": "claude-x-2025"}, "claude-x-2025", True),  # a target of the map
        ({"claude-x": "claude-x-2025"}, "claude-x", True),  # a client name it serves
        ({"claude-*": ""}, "claude-anything", True),  # a kept-name pattern covers it
        ({"*": ""}, "whatever", True),
        (["m"], "m", True),
        ({"claude-x": "claude-x-2025"}, "claude-sonet-typo", False),
        (["m"], "n", False),
        ({"gpt-*": "gpt-4o"}, "gpt-4o-mini", False),
    ],
)
def test_an_alias_must_name_a_model_its_provider_serves(models: Any, alias_model: str, ok: bool) -> None:
    config = {
        "providers": [provider("a", models=models)],
        "aliases": {"smart": [{"provider": "a", "model": alias_model}]},
    }
    if ok:
        assert order(table(config).candidates("smart", "chat")) == [f"a:{alias_model}"]
    else:
        with pytest.raises(
            ValueError, match=rf"aliases\.smart\[0\]\.model: provider 'a' does not serve '{alias_model}'"
        ):
            table(config)


def test_aliases_win_over_mappings_and_keep_their_model_names() -> None:
    config = {
        "providers": [
            provider("a", models={"*": ""}),
            provider("b", "anthropic", models={"*": "mapped", "claude-*": ""}),
        ],
        "aliases": {
            "smart": [{"provider": "b", "model": "claude-x", "weight": 1}, {"provider": "a", "model": "gpt-y"}]
        },
    }
    rt = table(config, ScriptedRandom([0.9]))
    assert order(rt.candidates("smart", "chat")) == ["a:gpt-y", "b:claude-x"]  # 0.9*2 = 1.8 -> second target
    assert order(rt.candidates("smart", "embeddings")) == ["a:gpt-y"]
    assert order(rt.candidates("smart", "chat", pin="b")) == ["b:claude-x"]
    # a model with no alias still goes through the mappings
    assert sorted(order(table(config, random.Random(1)).candidates("other", "chat"))) == ["a:other", "b:mapped"]


def test_model_ids_lists_exact_names_and_aliases_once() -> None:
    rt = table(
        {
            "providers": [
                provider("a", models={"gpt-4o": "x", "gpt-*": "", "*": "y"}),
                provider("b", models=["gpt-4o", "o3"]),
            ],
            "aliases": {"smart": [{"provider": "a", "model": "x"}]},
        }
    )
    assert sorted(rt.model_ids()) == [("gpt-4o", "a"), ("o3", "b"), ("smart", "llmproxy")]


def test_keys_rotate_round_robin_per_provider() -> None:
    rt = table({"providers": [provider("a", keys=["k1", "k2", "k3"]), provider("b")]})
    a, b = rt.providers["a"], rt.providers["b"]
    assert [a.next_key_index() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [b.next_key_index() for _ in range(3)] == [0, 0, 0]
    assert a.key_ids == tuple(key_id(k) for k in ("k1", "k2", "k3"))


def test_key_id_is_short_stable_and_hides_the_key() -> None:
    assert key_id("sk-secret-1") == key_id("sk-secret-1") != key_id("sk-secret-2")
    assert len(key_id("sk-secret-1")) == 12 and "secret" not in key_id("sk-secret-1")
    rt = table({"providers": [provider("a", keys=["sk-secret-1"])]})
    assert "sk-secret-1" not in repr(rt.providers["a"]) + repr(rt.providers["a"].targets)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("openai", [(b"authorization", b"Bearer sk-a")]),
        ("azure", [(b"api-key", b"sk-a")]),
        ("anthropic", [(b"x-api-key", b"sk-a")]),
    ],
)
def test_credential_header_per_adapter(kind: str, expected: list[tuple[bytes, bytes]]) -> None:
    rt = table({"providers": [provider("a", kind, headers={"x-extra": "1"})]})
    assert list(rt.providers["a"].targets[0].headers) == [(b"x-extra", b"1"), *expected]


# ---------------------------------------------------------------------------
# Config validation, through parse_config + build_chain (what startup runs)
# ---------------------------------------------------------------------------


def routing_config(routing: dict[str, Any]) -> dict[str, Any]:
    return {"filters": [{"name": "routing", "config": routing}]}


VALID: dict[str, Any] = {
    "providers": [
        {"name": "oa", "type": "openai", "base_url": "https://api.openai.com/v1", "keys": ["k"], "models": ["gpt"]},
        {"name": "an", "type": "anthropic", "base_url": "https://api.anthropic.com", "key": "k", "models": ["c"]},
    ],
    "aliases": {"smart": [{"provider": "an", "model": "c", "weight": 3}, {"provider": "oa", "model": "gpt"}]},
}


def routing_table(chain: Chain) -> RoutingTable:
    (factory,) = chain.factories
    assert isinstance(factory, RoutingFactory)
    return factory.table


def start_chain(config: dict[str, Any], env: dict[str, str] | None = None) -> Chain:
    cfg = parse_config(config, "routing.yaml", env=env or {})
    return build_chain(cfg.filters, FactoryContext(MemoryStore()), cfg.file)


def test_valid_config_builds() -> None:
    table_ = routing_table(start_chain(routing_config(VALID)))
    assert sorted(table_.providers) == ["an", "oa"] and list(table_.aliases) == ["smart"]


def edit(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    config = copy.deepcopy(VALID)
    change(config)
    return config


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _delete(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return change


BAD_CONFIGS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown adapter type", _set(["providers", 0, "type"], "watsonx"), "providers[0].type"),
    ("missing type", _delete(["providers", 0, "type"]), "providers[0].type"),
    ("missing base_url", _delete(["providers", 1, "base_url"]), "providers[1].base_url"),
    ("base_url not http", _set(["providers", 0, "base_url"], "ftp://x"), "providers[0].base_url"),
    ("missing name", _delete(["providers", 0, "name"]), "providers[0].name"),
    ("duplicate name", _set(["providers", 1, "name"], "oa"), "providers[1].name"),
    ("zero weight", _set(["providers", 0, "weight"], 0), "providers[0].weight"),
    ("negative weight", _set(["providers", 0, "weight"], -1), "providers[0].weight"),
    ("string weight", _set(["providers", 0, "weight"], "3"), "providers[0].weight"),
    ("bool weight", _set(["providers", 0, "weight"], True), "providers[0].weight"),
    ("bad alias weight", _set(["aliases", "smart", 1, "weight"], 0), "aliases.smart[1].weight"),
    ("alias names unknown provider", _set(["aliases", "smart", 0, "provider"], "bedrock"), "aliases.smart[0].provider"),
    ("alias target without model", _delete(["aliases", "smart", 0, "model"]), "aliases.smart[0].model"),
    ("alias unknown key", _set(["aliases", "smart", 0, "region"], "eu"), "aliases.smart[0].region"),
    ("empty alias", _set(["aliases", "smart"], []), "aliases.smart"),
    ("unknown provider key", _set(["providers", 0, "region"], "eu"), "providers[0].region"),
    ("option of another adapter", _set(["providers", 0, "api_version"], "2024-10-21"), "providers[0].api_version"),
    ("bad anthropic option", _set(["providers", 1, "default_max_tokens"], 0), "providers[1].default_max_tokens"),
    ("bad model pattern", _set(["providers", 0, "models"], {"a*b": "x"}), "providers[0].models.a*b"),
    ("no models", _delete(["providers", 0, "models"]), "providers[0].models"),
    ("keys not strings", _set(["providers", 0, "keys"], [1]), "providers[0].keys"),
    ("duplicate key", _set(["providers", 0, "keys"], ["k", "k"]), "providers[0].keys"),
    ("bad timeout", _set(["providers", 0, "timeouts"], {"connect": -1}), "providers[0].timeouts.connect"),
    ("no providers", _set(["providers"], []), "providers"),
    ("unknown section key", _set(["routes"], {}), "routes"),
]


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_field(change: Callable[[dict[str, Any]], None], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        start_chain(routing_config(edit(change)))
    err = info.value
    assert err.path == "filters[0].config"
    assert f"filter 'routing': {field}:" in err.reason, err.reason
    assert str(err).startswith("routing.yaml"), str(err)


def test_unset_key_variable_is_a_config_error_without_default() -> None:
    config = edit(_set(["providers", 0, "keys"], ["${ROUTING_TEST_UNSET_KEY}"]))
    with pytest.raises(ConfigError) as info:
        start_chain(routing_config(config))
    assert info.value.path == "filters[0].config.providers[0].keys[0]"
    assert "ROUTING_TEST_UNSET_KEY" in info.value.reason


def test_keys_come_from_the_environment() -> None:
    config = edit(_set(["providers", 0, "keys"], ["${ROUTING_KEY_A:-}", "${ROUTING_KEY_B:-}"]))
    with pytest.raises(ConfigError, match=r"providers\[0\]\.keys: provider 'oa' has no key"):
        start_chain(routing_config(config))
    env = {"ROUTING_KEY_A": "sk-from-env"}
    one = routing_table(start_chain(routing_config(config), env)).providers["oa"]
    assert one.key_ids == (key_id("sk-from-env"),)
    assert one.targets[0].headers[-1] == (b"authorization", b"Bearer sk-from-env")


# ---------------------------------------------------------------------------
# conf/providers.example.yaml and `llmproxy check`
# ---------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """The environment without any provider key or resource variable."""
    prefixes = ("OPENAI", "AZURE", "ANTHROPIC", "VLLM", "OLLAMA")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def llmproxy_check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


EXAMPLE_KEYS = {"OPENAI_API_KEY": "sk-o", "AZURE_OPENAI_API_KEY": "az", "ANTHROPIC_API_KEY": "sk-ant"}


def test_example_config_check_names_a_missing_key_and_passes_with_keys() -> None:
    done = llmproxy_check(EXAMPLE, clean_env())
    assert done.returncode == 1
    assert "environment variable OPENAI_API_KEY is not set" in done.stderr
    done = llmproxy_check(EXAMPLE, clean_env() | EXAMPLE_KEYS)
    assert done.returncode == 0, done.stderr
    assert "ok (1 filter: routing)" in done.stdout


def test_example_config_content() -> None:
    cfg = parse_config(yaml.safe_load(EXAMPLE.read_text()), str(EXAMPLE), env=EXAMPLE_KEYS)
    rt = routing_table(build_chain(cfg.filters, FactoryContext(MemoryStore()), cfg.file))
    kinds = {name: p.adapter.type_name for name, p in rt.providers.items()}
    assert kinds == {
        "openai": "openai",
        "azure": "azure",
        "anthropic": "anthropic",
        "vllm": "openai",
        "ollama": "openai",
    }
    assert all(p.has_keys for p in rt.providers.values())
    assert set(rt.aliases) >= {"smart"}
    assert order(rt.candidates("ollama/anything", "chat")) == ["ollama:qwen2.5:7b"]

    env = {"OPENAI_API_KEY": "sk-o", "AZURE_OPENAI_API_KEY": "az", "ANTHROPIC_API_KEY": "sk-ant"}
    cfg = parse_config(yaml.safe_load(EXAMPLE.read_text()), str(EXAMPLE), env=env)
    rt = routing_table(build_chain(cfg.filters, FactoryContext(MemoryStore()), cfg.file))
    assert sorted(t.provider.name for t in rt.candidates("gpt-4o", "chat")) == ["azure", "openai"]
    assert order(rt.candidates("claude-sonnet-4-5", "chat")) == ["anthropic:claude-sonnet-4-5-20250929"]
    origins = {name: (p.targets[0].scheme, p.targets[0].host, p.targets[0].port) for name, p in rt.providers.items()}
    assert origins == {
        "openai": ("https", "api.openai.com", 443),
        "azure": ("https", "my-resource.openai.azure.com", 443),
        "anthropic": ("https", "api.anthropic.com", 443),
        "vllm": ("http", "127.0.0.1", 8000),
        "ollama": ("http", "127.0.0.1", 11434),
    }
    assert rt.providers["azure"].adapter.path("chat", "my-gpt-4o-deployment", "") == (
        "/openai/deployments/my-gpt-4o-deployment/chat/completions?api-version=2024-10-21"
    )


def test_check_rejects_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    bad = edit(_set(["providers", 0, "models"], {"gpt*4": "x"}))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(routing_config(bad)))
    done = llmproxy_check(path, clean_env())
    assert done.returncode != 0
    assert "providers[0].models.gpt*4" in done.stderr and "trailing '*'" in done.stderr, done.stderr


# ---------------------------------------------------------------------------
# The per-exchange filter through the harness: what a failover filter relies on
# ---------------------------------------------------------------------------

HARNESS_CONFIG: dict[str, Any] = {
    "providers": [
        provider("az", "azure", models={"m": "dep"}),
        provider("oa", keys=["sk-oa-1", "sk-oa-2"]),
        provider("an", "anthropic", anthropic_version="2000-01-01"),
    ]
}


def routed_exchange(h: FilterHarness, path: str, pin: str, **headers: str) -> tuple[Exchange, RoutingFilter]:
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
    ex = h.exchange(path=path, json=body, headers={"x-llmproxy-provider": pin, **headers})
    assert h.request_headers(ex) is Action.CONTINUE
    assert h.request_body(ex) is Action.CONTINUE
    flt = h.filter(ex)
    assert isinstance(flt, RoutingFilter)
    return ex, flt


def target_of(flt: RoutingFilter, name: str, api: str) -> Target:
    return next(t for t in flt.factory.table.candidates("m", api) if t.provider.name == name)


def test_apply_again_keeps_the_clients_query() -> None:
    with FilterHarness(RoutingFactory, HARNESS_CONFIG) as h:
        ex, flt = routed_exchange(h, "/v1/chat/completions?trace=1", "az")
        assert ex.request.path == "/openai/deployments/dep/chat/completions?api-version=2024-10-21"
        flt.apply(ex, target_of(flt, "oa", "chat"), 1)
        assert ex.request.path == "/chat/completions?trace=1"  # not Azure's api-version
        assert ex.upstream is flt.factory.table.providers["oa"].targets[1]
        route = ex.vars["routing.route"]
        assert route.provider == "oa" and route.key_id == key_id("sk-oa-2") and route.key_index == 1
        assert flt.attempted == [("az", 0), ("oa", 1)]
        assert flt.current is not None and flt.current.provider.name == "oa"


def test_apply_again_gives_protocol_headers_back() -> None:
    client_headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "b1", "openai-organization": "org"}
    with FilterHarness(RoutingFactory, HARNESS_CONFIG) as h:
        ex, flt = routed_exchange(h, "/v1/messages", "oa", **client_headers)

        def prefixed() -> dict[str, str]:
            return {k: v for k, v in ex.request.headers if k.startswith(("anthropic-", "openai-"))}

        assert prefixed() == {"openai-organization": "org"}
        assert "x-llmproxy-provider" not in ex.request.headers
        flt.apply(ex, target_of(flt, "an", "messages"), 0)
        # the client's own anthropic-* headers are back, and its version wins over the configured one
        assert prefixed() == {"anthropic-version": "2023-06-01", "anthropic-beta": "b1"}
        assert ex.request_json()["model"] == "m" and ex.request.path == "/v1/messages"
        flt.apply(ex, target_of(flt, "oa", "messages"), 0)
        assert prefixed() == {"openai-organization": "org"}
        assert ex.request_json()["messages"] == [{"role": "user", "content": "x"}]


CHAT_REPLY = {
    "id": "c",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
MESSAGE_REPLY = {
    "id": "msg",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 2},
}


@pytest.mark.parametrize(
    ("path", "pin", "reply"),
    [("/v1/chat/completions", "an", MESSAGE_REPLY), ("/v1/messages", "oa", CHAT_REPLY)],
)
def test_translated_reply_leaves_openai_shaped_usage(path: str, pin: str, reply: dict[str, Any]) -> None:
    with FilterHarness(RoutingFactory, HARNESS_CONFIG) as h:
        ex, _ = routed_exchange(h, path, pin)
        assert h.response_headers(ex, 200, {"content-type": "application/json"}) is Action.PAUSE
        _, out = h.response_body(ex, json.dumps(reply).encode(), True)
        assert json.loads(out)["usage"]["total_tokens" if pin == "an" else "output_tokens"] > 0
        usage = ex.vars["routing.usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 2)
