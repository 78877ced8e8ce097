"""The ``auth`` filter end to end: real proxy, real mock provider, the official SDKs and raw sockets.

Good keys in every header the SDKs use, refusals in both protocols (401 for
a missing, malformed or unknown key, 403 for a model outside the key's
allow-list, count endpoints and ``/v1/models`` included), the key never
reaching a provider, the keys file reload (revocation, a broken file keeping
the old keys), config errors naming the field, the failure metric and the
access log's ``principal=``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from llmproxy import FactoryContext, MemoryStore, Principal
from llmproxy.filters.auth import AuthFactory, hash_key, key_id
from llmproxy.filters.auth.credential import MALFORMED, MISSING, presented_key
from llmproxy.mock import MockServer
from llmproxy.runtime.config import ConfigError, load_config, parse_config
from llmproxy.runtime.plugins import build_chain

from ..support import RunningProxy, raw_exchange, status_of
from .scripted_provider import Scripted

Make = Callable[[dict[str, Any]], RunningProxy]

ALICE = "sk-test-alice-3b1f0c9e7d"  # any model
BOB = "sk-test-bob-55aa90e1c4"  # gpt-x only
CAROL = "sk-test-carol-a0c4e6f2"  # from a keys file in the reload tests
PROVIDER_KEY = "sk-provider-oa-000111"
HI: list[Any] = [{"role": "user", "content": "hello"}]


def _keys() -> list[dict[str, Any]]:
    return [
        {"name": "alice", "key_hash": hash_key(ALICE), "team": "research", "metadata": {"owner": "a@x"}},
        {"name": "bob", "key_hash": hash_key(BOB), "models": ["gpt-x"], "limits": {"rpm": 5}},
    ]


def _config(port: int, auth: dict[str, Any] | None = None, access_log: str = "text") -> dict[str, Any]:
    return {
        "server": {"access_log": access_log},
        "filters": [
            {"name": "auth", "config": auth if auth is not None else {"keys": _keys()}},
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "oa",
                            "type": "openai",
                            "base_url": f"http://127.0.0.1:{port}/v1",
                            "keys": [PROVIDER_KEY],
                            "models": {"gpt-x": "mock-gpt", "gpt-y": "mock-gpt-y"},
                        },
                        {
                            "name": "an",
                            "type": "anthropic",
                            "base_url": f"http://127.0.0.1:{port}",
                            "keys": ["sk-provider-an-000222"],
                            "models": {"claude-x": "mock-claude"},
                        },
                    ]
                },
            },
        ],
    }


@pytest.fixture
def authed(mock: MockServer, make_proxy: Make) -> RunningProxy:
    return make_proxy(_config(mock.port))


def _oa(proxy: RunningProxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=10)


def _an(proxy: RunningProxy, key: str | None = None, token: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, auth_token=token, max_retries=0, timeout=10)


def _raw(port: int, path: str, headers: list[tuple[str, str]], body: dict[str, Any] | None) -> tuple[int, Any, str]:
    """Status, parsed JSON body and the raw head of one request on a fresh connection."""
    payload = json.dumps(body).encode() if body is not None else b""
    method = "POST" if body is not None else "GET"
    head = f"{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    if body is not None:
        head += f"content-length: {len(payload)}\r\n"
    response = raw_exchange(port, head.encode() + b"\r\n" + payload)
    raw_head, _, raw_body = response.partition(b"\r\n\r\n")
    return status_of(response), json.loads(raw_body), raw_head.decode().lower()


def _access_line(caplog: pytest.LogCaptureFixture, needle: str, timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "llmproxy.access" and needle in record.getMessage():
                return record.getMessage()
        time.sleep(0.01)
    raise AssertionError(f"no access log line with {needle!r}")


# ---------------------------------------------------------------------------
# Good keys: every header, both SDKs
# ---------------------------------------------------------------------------


def test_openai_sdk_with_a_good_key(authed: RunningProxy, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llmproxy.access"):
        reply = _oa(authed, ALICE).chat.completions.create(model="gpt-x", messages=HI)
        line = _access_line(caplog, "/v1/chat/completions")
    assert reply.object == "chat.completion"
    assert "principal=alice" in line and ALICE not in line


def test_json_access_log_names_the_principal(
    mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(_config(mock.port, access_log="json"))
    with caplog.at_level(logging.INFO, logger="llmproxy.access"):
        _oa(proxy, BOB).chat.completions.create(model="gpt-x", messages=HI)
        _raw(proxy.port, "/v1/models", [], None)
        good = json.loads(_access_line(caplog, '"status":200'))
        refused = json.loads(_access_line(caplog, '"status":401'))
    assert good["principal"] == "bob" and refused["principal"] is None


def test_openai_sdk_stream_with_a_key_limited_to_the_model(authed: RunningProxy) -> None:
    stream = _oa(authed, BOB).chat.completions.create(model="gpt-x", messages=HI, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_anthropic_sdk_with_x_api_key_and_with_bearer(authed: RunningProxy) -> None:
    for client in (_an(authed, key=ALICE), _an(authed, token=ALICE)):
        reply = client.messages.create(model="claude-x", max_tokens=16, messages=HI)
        assert reply.type == "message" and reply.content


def test_azure_api_key_header(authed: RunningProxy) -> None:
    status, body, _ = _raw(
        authed.port, "/v1/chat/completions", [("api-key", ALICE)], {"model": "gpt-x", "messages": HI}
    )
    assert status == 200 and body["object"] == "chat.completion"


def test_the_principal_is_what_the_config_says(authed: RunningProxy) -> None:
    factory = authed.runtime.chain.factories[0]
    assert isinstance(factory, AuthFactory)
    by_name = {p.name: p for p in factory.principals}
    alice, bob = by_name["alice"], by_name["bob"]
    assert isinstance(alice, Principal)
    assert (alice.key_id, alice.team, alice.models, dict(alice.metadata)) == (
        key_id(hash_key(ALICE)),
        "research",
        (),
        {"owner": "a@x"},
    )
    assert alice.key_id.startswith("vk-") and len(alice.key_id) == 11
    assert bob.models == ("gpt-x",) and dict(bob.limits) == {"rpm": 5} and dict(bob.budgets) == {}


# ---------------------------------------------------------------------------
# Refusals: 401 in the client's protocol
# ---------------------------------------------------------------------------

REFUSED = [
    pytest.param([], id="missing"),
    pytest.param([("authorization", "Bearer sk-test-nobody-1234")], id="unknown-bearer"),
    pytest.param([("x-api-key", "sk-test-nobody-1234")], id="unknown-x-api-key"),
    pytest.param([("api-key", "sk-test-nobody-1234")], id="unknown-api-key"),
    pytest.param([("authorization", "Bearer")], id="bearer-without-key"),
    pytest.param([("authorization", "Bearer   ")], id="bearer-spaces"),
    pytest.param([("authorization", ALICE)], id="no-scheme"),
    pytest.param([("authorization", f"Basic {ALICE}")], id="basic-scheme"),
    pytest.param([("authorization", f"Bearer {ALICE} extra")], id="two-words"),
    pytest.param([("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {ALICE}")], id="two-authorization"),
    pytest.param([("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {BOB}")], id="two-keys"),
    pytest.param([("authorization", f"Bearer {ALICE}"), ("x-api-key", BOB)], id="bearer-and-other-x-api-key"),
    pytest.param([("x-api-key", ALICE), ("x-api-key", ALICE)], id="two-x-api-key"),
    pytest.param([("authorization", f"Bearer {ALICE[:-1]}")], id="prefix-of-a-key"),
    pytest.param([("authorization", f"Bearer {ALICE.upper()}")], id="case-changed"),
]


@pytest.mark.parametrize("headers", REFUSED)
def test_refused_openai_style(authed: RunningProxy, headers: list[tuple[str, str]]) -> None:
    status, body, head = _raw(authed.port, "/v1/chat/completions", headers, {"model": "gpt-x", "messages": HI})
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_api_key"
    assert "www-authenticate: bearer" in head
    assert ALICE not in json.dumps(body) and BOB not in json.dumps(body)


@pytest.mark.parametrize("headers", REFUSED)
def test_refused_anthropic_style(authed: RunningProxy, headers: list[tuple[str, str]]) -> None:
    body_in = {"model": "claude-x", "max_tokens": 8, "messages": HI}
    status, body, head = _raw(authed.port, "/v1/messages", headers, body_in)
    assert status == 401
    assert body == {"type": "error", "error": {"type": "authentication_error", "message": body["error"]["message"]}}
    assert "www-authenticate" not in head
    assert ALICE not in body["error"]["message"]


def test_the_same_key_in_two_headers_is_one_credential(authed: RunningProxy) -> None:
    headers = [("authorization", f"Bearer {ALICE}"), ("x-api-key", ALICE), ("api-key", ALICE)]
    status, _, _ = _raw(authed.port, "/v1/chat/completions", headers, {"model": "gpt-x", "messages": HI})
    assert status == 200


def test_sdk_errors_for_an_unknown_key(authed: RunningProxy) -> None:
    with pytest.raises(openai.AuthenticationError) as oa_err:
        _oa(authed, "sk-test-wrong-999").chat.completions.create(model="gpt-x", messages=HI)
    assert oa_err.value.status_code == 401 and oa_err.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as an_err:
        _an(authed, key="sk-test-wrong-999").messages.create(model="claude-x", max_tokens=8, messages=HI)
    assert an_err.value.status_code == 401


def test_models_and_count_endpoints_need_a_key_too(authed: RunningProxy) -> None:
    status, body, _ = _raw(authed.port, "/v1/models", [], None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = _raw(
        authed.port, "/v1/messages/count_tokens", [("x-api-key", "sk-bad-00000")], {"model": "claude-x", "messages": HI}
    )
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_a_refused_request_leaves_the_connection_usable(authed: RunningProxy) -> None:
    """A 401 sent before the body was read: the next request on the connection is still answered right."""
    body = json.dumps({"model": "gpt-x", "messages": HI}).encode()

    def request(key: str, last: bool = False) -> bytes:
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            f"{'connection: close' + chr(13) + chr(10) if last else ''}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body

    data = raw_exchange(authed.port, request("sk-test-nobody-00") + request(ALICE, last=True), timeout=3)
    assert status_of(data) == 401
    rest = data.split(b"\r\n\r\n", 1)[1]
    assert b"HTTP/1.1 200" in rest  # kept alive: the unread body was skipped, the next request read in place


# ---------------------------------------------------------------------------
# Model allow-list: 403
# ---------------------------------------------------------------------------


def test_model_not_allowed_openai(authed: RunningProxy, mock: MockServer) -> None:
    before = len(mock.requests)
    with pytest.raises(openai.PermissionDeniedError) as err:
        _oa(authed, BOB).chat.completions.create(model="gpt-y", messages=HI)
    assert err.value.status_code == 403
    assert err.value.body == {
        "message": "this key may not use the model 'gpt-y'",
        "type": "permission_error",
        "param": "model",
        "code": "model_not_allowed",
    }
    assert len(mock.requests) == before  # never sent


def test_model_not_allowed_anthropic(authed: RunningProxy) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        _an(authed, key=BOB).messages.create(model="claude-x", max_tokens=8, messages=HI)
    assert err.value.status_code == 403
    assert err.value.body == {
        "type": "error",
        "error": {"type": "permission_error", "message": "this key may not use the model 'claude-x'"},
    }


@pytest.mark.parametrize("validate_json", [True, False])
@pytest.mark.parametrize(
    "body",
    [
        b' {"model":"gpt-y","messages":[]}',
        b'\n\t{"model":"gpt-y","messages":[]}',
        b'{"model":"gpt-x","model":"gpt-y","messages":[]}',  # the last one counts, for routing too
        b'{"model":"gpt-\\u0079","messages":[]}',
    ],
    ids=["space", "newline-tab", "duplicate-model", "escaped"],
)
def test_the_allow_list_reads_the_json_as_routing_does(
    mock: MockServer, make_proxy: Make, body: bytes, validate_json: bool
) -> None:
    config = _config(mock.port)
    config["server"]["validate_json"] = validate_json
    proxy = make_proxy(config)
    before = len(mock.requests)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {BOB}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    response = raw_exchange(proxy.port, head.encode() + body)
    assert status_of(response) == 403 and b"model_not_allowed" in response
    assert len(mock.requests) == before


def test_model_not_allowed_on_count_and_embeddings_endpoints(authed: RunningProxy) -> None:
    status, body, _ = _raw(
        authed.port, "/v1/messages/count_tokens", [("x-api-key", BOB)], {"model": "claude-x", "messages": HI}
    )
    assert status == 403 and body["error"]["type"] == "permission_error"
    status, body, _ = _raw(
        authed.port, "/v1/embeddings", [("authorization", f"Bearer {BOB}")], {"model": "gpt-y", "input": "x"}
    )
    assert status == 403 and body["error"]["code"] == "model_not_allowed"


def test_models_list_shows_only_the_allowed_models(authed: RunningProxy) -> None:
    assert sorted(m.id for m in _oa(authed, ALICE).models.list()) == ["claude-x", "gpt-x", "gpt-y"]
    assert [m.id for m in _oa(authed, BOB).models.list()] == ["gpt-x"]


def test_models_retrieve_with_both_sdks(authed: RunningProxy) -> None:
    """``models.retrieve`` (GET /v1/models/{id}): the model object in each SDK's shape, 404 for a
    model nothing serves, and the same 404 for one the key may not use."""
    model = _oa(authed, ALICE).models.retrieve("gpt-y")
    assert (model.id, model.owned_by) == ("gpt-y", "oa")
    info = _an(authed, ALICE).models.retrieve("claude-x")
    assert (info.id, info.type) == ("claude-x", "model")
    with pytest.raises(openai.NotFoundError) as missing:
        _oa(authed, ALICE).models.retrieve("gpt-nope")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as hidden:
        _oa(authed, BOB).models.retrieve("gpt-y")
    assert hidden.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError):
        _an(authed, BOB).models.retrieve("claude-x")
    with pytest.raises(openai.AuthenticationError):
        _oa(authed, "sk-test-nobody-1").models.retrieve("gpt-x")


def test_fnmatch_patterns(mock: MockServer, make_proxy: Make) -> None:
    keys = [{"name": "p", "key": ALICE, "models": ["gpt-*"]}]
    proxy = make_proxy(_config(mock.port, {"keys": keys}))
    client = _oa(proxy, ALICE)
    assert client.chat.completions.create(model="gpt-y", messages=HI).object == "chat.completion"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="claude-x", messages=HI)


# ---------------------------------------------------------------------------
# The key never reaches a provider, never a log line
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", f"Bearer {ALICE}")],
        [("x-api-key", ALICE)],
        [("api-key", ALICE)],
        [("authorization", f"Bearer {ALICE}"), ("x-api-key", ALICE), ("api-key", ALICE)],
    ],
    ids=["bearer", "x-api-key", "api-key", "all-three"],
)
def test_the_virtual_key_never_reaches_the_provider(
    scripted: Scripted, make_proxy: Make, headers: list[tuple[str, str]]
) -> None:
    config = _config(0)
    config["filters"][1]["config"]["providers"][0]["base_url"] = scripted.url + "/v1"
    proxy = make_proxy(config)
    path = "/v1/chat/completions?api_key=" + ALICE
    status, _, _ = _raw(proxy.port, path, headers, {"model": "gpt-x", "messages": HI})
    assert status == 200
    seen = scripted.requests[-1]
    assert seen.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "x-api-key" not in seen.headers and "api-key" not in seen.headers
    assert ALICE not in json.dumps(seen.headers) and ALICE not in seen.target and ALICE not in json.dumps(seen.body)


def test_keys_never_appear_in_logs(mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture) -> None:
    keys = [*_keys(), {"name": "plain", "key": CAROL}]
    with caplog.at_level(logging.DEBUG):
        proxy = make_proxy(_config(mock.port, {"keys": keys}))
        _oa(proxy, ALICE).chat.completions.create(model="gpt-x", messages=HI)
        _oa(proxy, CAROL).chat.completions.create(model="gpt-x", messages=HI)
        for key in (BOB + "x", "sk-never-configured-1"):
            with pytest.raises(openai.APIStatusError):
                _oa(proxy, key).chat.completions.create(model="gpt-y", messages=HI)
        with pytest.raises(openai.PermissionDeniedError):
            _oa(proxy, BOB).chat.completions.create(model="gpt-y", messages=HI)
        _access_line(caplog, "model_not_allowed")
    text = "\n".join(r.getMessage() for r in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmproxy.auth" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'plain'" in warnings[0] and "plaintext" in warnings[0]
    for secret in (ALICE, BOB, CAROL, "sk-never-configured-1"):
        assert secret not in text
    assert "principal=alice" in text and "principal=plain" in text and "principal=bob" in text


# ---------------------------------------------------------------------------
# Keys file: reload without restart
# ---------------------------------------------------------------------------


def _write_keys(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))  # JSON is YAML
    os.replace(tmp, path)


def _wait_status(proxy: RunningProxy, key: str, status: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got, _, _ = _raw(proxy.port, "/v1/models", [("authorization", f"Bearer {key}")], None)
        if got == status:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"status {got}, expected {status}")


def test_keys_file_revocation_and_a_broken_file(
    mock: MockServer, make_proxy: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file = tmp_path / "keys.yaml"
    carol = {"name": "carol", "key_hash": hash_key(CAROL)}
    bob = {"name": "bob", "key_hash": hash_key(BOB)}
    _write_keys(keys_file, [carol, bob])
    auth = {"keys": [_keys()[0]], "keys_file": str(keys_file), "reload_interval": 0.1}
    proxy = make_proxy(_config(mock.port, auth))
    _wait_status(proxy, CAROL, 200, timeout=0)
    _wait_status(proxy, BOB, 200, timeout=0)

    factory = proxy.runtime.chain.factories[0]
    carol_before = next(p for p in factory.principals if p.name == "carol")
    _write_keys(keys_file, [carol])  # bob revoked
    _wait_status(proxy, BOB, 401)
    assert next(p for p in factory.principals if p.name == "carol") is carol_before  # unchanged: the same object
    _wait_status(proxy, CAROL, 200, timeout=0)
    _wait_status(proxy, ALICE, 200, timeout=0)  # inline keys stay

    with caplog.at_level(logging.ERROR, logger="llmproxy.auth"):
        keys_file.write_text("keys: [ {name: carol, key_hash: 'sha256:nothex'} ]\n")
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.35)  # a few more ticks: still one line
        errors = [r.getMessage() for r in caplog.records if r.name == "llmproxy.auth"]
    assert len(errors) == 1, errors
    assert "keys[0].key_hash" in errors[0] and str(keys_file) in errors[0] and "keeping 2 keys" in errors[0]
    _wait_status(proxy, CAROL, 200, timeout=0)  # the old table is still in force

    _write_keys(keys_file, [carol, {"name": "alice", "key_hash": hash_key(BOB)}])  # clashes with inline alice
    time.sleep(0.4)
    _wait_status(proxy, BOB, 401, timeout=0)

    _write_keys(keys_file, [{"name": "bob2", "key_hash": hash_key(BOB), "models": ["gpt-x"]}])  # a new key
    _wait_status(proxy, BOB, 200)
    _wait_status(proxy, CAROL, 401, timeout=0)

    keys_file.unlink()  # a missing file keeps the table too
    time.sleep(0.3)
    _wait_status(proxy, BOB, 200, timeout=0)


def test_keys_file_is_relative_to_the_config_file(tmp_path: Path, loop_thread: Any) -> None:
    _write_keys(tmp_path / "keys.yaml", [{"name": "carol", "key_hash": hash_key(CAROL)}])
    (tmp_path / "conf.yaml").write_text(
        "filters:\n  - name: auth\n    config: {keys_file: keys.yaml}\n", encoding="utf-8"
    )
    cfg = load_config(tmp_path / "conf.yaml")
    chain = build_chain(cfg.filters, FactoryContext(MemoryStore(), config_file=cfg.file), cfg.file)
    factory = chain.factories[0]
    assert isinstance(factory, AuthFactory)
    assert [p.name for p in factory.principals] == ["carol"]


# ---------------------------------------------------------------------------
# Config errors: refused at startup, naming file, field and reason
# ---------------------------------------------------------------------------

GOOD = {"name": "a", "key_hash": hash_key(ALICE)}
BAD_CONFIGS = [
    pytest.param({}, "keys: is required", id="no-keys"),
    pytest.param({"keys": [{"name": "a", "key_hash": "sha256:abc"}]}, "keys[0].key_hash: must be sha256:", id="short"),
    pytest.param({"keys": [{"name": "a", "key_hash": "md5:" + "0" * 64}]}, "keys[0].key_hash", id="algorithm"),
    pytest.param({"keys": [{"name": "a", "key_hash": "sha256:" + "g" * 64}]}, "keys[0].key_hash", id="not-hex"),
    pytest.param({"keys": [{"name": "a"}]}, "keys[0].key_hash: is required", id="no-key"),
    pytest.param({"keys": [{**GOOD, "key": ALICE}]}, "keys[0].key: give key_hash or key", id="both"),
    pytest.param({"keys": [{"key": ALICE}]}, "keys[0].name: is required", id="no-name"),
    pytest.param({"keys": [{**GOOD, "name": "a b"}]}, "keys[0].name: must be", id="name-with-space"),
    pytest.param({"keys": [GOOD, {"name": "a", "key": BOB}]}, "keys[1].name: duplicate name 'a'", id="dup-name"),
    pytest.param({"keys": [GOOD, {"name": "b", "key": ALICE}]}, "keys[1]: entry 'b' has the same key", id="dup-key"),
    pytest.param({"keys": [{**GOOD, "rpm": 3}]}, "keys[0].rpm: unknown key", id="unknown-entry-field"),
    pytest.param({"keys": [GOOD], "reload": 1}, "reload: unknown key", id="unknown-field"),
    pytest.param({"keys": [{**GOOD, "models": []}]}, "keys[0].models: must be a non-empty list", id="empty-models"),
    pytest.param({"keys": [{**GOOD, "models": "gpt"}]}, "keys[0].models: must be a list", id="models-str"),
    pytest.param({"keys": [{**GOOD, "limits": [1]}]}, "keys[0].limits: must be a mapping", id="limits-list"),
    pytest.param({"keys": [{**GOOD, "metadata": {"n": 1}}]}, "keys[0].metadata.n: must map strings", id="metadata"),
    pytest.param({"keys": [GOOD], "reload_interval": 0}, "reload_interval: must be greater than 0", id="interval"),
    pytest.param({"keys": GOOD}, "keys: must be a list", id="keys-mapping"),
    pytest.param({"keys_file": "/nonexistent/keys.yaml"}, "keys_file: /nonexistent/keys.yaml: cannot read", id="file"),
]


@pytest.mark.parametrize(("auth", "message"), BAD_CONFIGS)
def test_bad_config_is_refused_naming_the_field(auth: dict[str, Any], message: str) -> None:
    cfg = parse_config({"filters": [{"name": "auth", "config": auth}]}, "conf.yaml")
    with pytest.raises(ConfigError) as err:
        build_chain(cfg.filters, FactoryContext(MemoryStore()), cfg.file)
    text = str(err.value)
    assert text.startswith("conf.yaml: filters[0].config: filter 'auth': "), text
    assert message in text, text
    assert ALICE not in text and BOB not in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("keys: [", "invalid YAML: line", id="yaml"),
        pytest.param("- name: a\n", "must be a mapping", id="list-at-top"),
        pytest.param("entries: []\n", "entries: unknown key", id="unknown-top"),
        pytest.param("{}\n", "keys: is required", id="no-keys"),
        pytest.param("keys:\n  - {name: a, key_hash: 'sha256:00'}\n", "keys[0].key_hash: must be", id="bad-hash"),
        pytest.param(
            f"keys:\n  - {{name: alice, key_hash: '{hash_key(BOB)}'}}\n", "duplicate name 'alice'", id="clash-name"
        ),
        pytest.param(f"keys:\n  - {{name: z, key_hash: '{hash_key(ALICE)}'}}\n", "same key as 'alice'", id="clash"),
    ],
)
def test_bad_keys_file_is_refused_naming_file_and_field(tmp_path: Path, content: str, message: str) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(content)
    auth = {"keys": [{"name": "alice", "key_hash": hash_key(ALICE)}], "keys_file": str(keys_file)}
    cfg = parse_config({"filters": [{"name": "auth", "config": auth}]}, "conf.yaml")
    with pytest.raises(ConfigError) as err:
        build_chain(cfg.filters, FactoryContext(MemoryStore()), cfg.file)
    text = str(err.value)
    assert text.startswith(f"conf.yaml: filters[0].config: filter 'auth': keys_file: {keys_file}: "), text
    assert message in text, text


def test_uppercase_hash_and_an_empty_keys_file_are_accepted(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys: []\n")
    auth = {"keys": [{"name": "a", "key_hash": hash_key(ALICE).upper().replace("SHA256", "sha256")}]}
    auth["keys_file"] = str(keys_file)  # type: ignore[assignment]
    cfg = parse_config({"filters": [{"name": "auth", "config": auth}]}, "conf.yaml")
    factory = build_chain(cfg.filters, FactoryContext(MemoryStore()), cfg.file).factories[0]
    assert isinstance(factory, AuthFactory)
    assert [p.key_id for p in factory.principals] == [key_id(hash_key(ALICE))]


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def _metric(proxy: RunningProxy, reason: str) -> float:
    with urllib.request.urlopen(proxy.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f'llmproxy_auth_failures_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no llmproxy_auth_failures_total for {reason}")


def test_healthz_and_metrics_need_no_key(authed: RunningProxy) -> None:
    """Answered by the connection before any filter runs (admin pages: ``server.admin_allow``)."""
    for path in ("/healthz", "/metrics"):
        with urllib.request.urlopen(authed.url + path, timeout=5) as resp:
            assert resp.status == 200


def test_failure_metric_by_reason(authed: RunningProxy) -> None:
    assert [_metric(authed, r) for r in ("missing", "malformed", "unknown", "model_not_allowed")] == [0, 0, 0, 0]
    _raw(authed.port, "/v1/models", [], None)
    _raw(authed.port, "/v1/models", [("authorization", "Bearer")], None)
    for _ in range(2):
        _raw(authed.port, "/v1/models", [("authorization", "Bearer sk-test-nobody-99")], None)
    _raw(authed.port, "/v1/chat/completions", [("x-api-key", BOB)], {"model": "gpt-y", "messages": HI})
    _raw(authed.port, "/v1/chat/completions", [("x-api-key", BOB)], {"model": "gpt-x", "messages": HI})
    assert [_metric(authed, r) for r in ("missing", "malformed", "unknown", "model_not_allowed")] == [1, 1, 2, 1]


# ---------------------------------------------------------------------------
# Credential parsing (the pure function)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([], MISSING),
        ([(b"content-type", b"x")], MISSING),
        ([(b"authorization", b"Bearer k1")], b"k1"),
        ([(b"authorization", b"bearer k1")], b"k1"),
        ([(b"authorization", b"BEARER  k1")], b"k1"),
        ([(b"x-api-key", b"k1")], b"k1"),
        ([(b"api-key", b"k1")], b"k1"),
        ([(b"authorization", b"Bearer  k1")], b"k1"),
        ([(b"authorization", b"Bearer k1 k2")], MALFORMED),
        ([(b"x-api-key", b"k1"), (b"authorization", b"Bearer k1")], b"k1"),
        ([(b"x-api-key", b"")], MALFORMED),
        ([(b"authorization", b"Bearer")], MALFORMED),
        ([(b"authorization", b"Token k1")], MALFORMED),
        ([(b"authorization", b"Bearer k1"), (b"authorization", b"Bearer k1")], MALFORMED),
        ([(b"api-key", b"k1"), (b"x-api-key", b"k2")], MALFORMED),
    ],
)
def test_presented_key(fields: list[tuple[bytes, bytes]], expected: bytes | str) -> None:
    assert presented_key(fields) == expected
