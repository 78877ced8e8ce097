"""The ``cors`` filter end to end over raw sockets, replaying the exact header sets Chromium sends.

Playwright's browser download needs the network, so the preflight and the
credentialed ``fetch`` are replayed as headless Chromium 131 writes them
(header names and order as captured from ``chrome://net-export``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llmproxy import FactoryContext, MemoryStore
from llmproxy.filters.auth import hash_key
from llmproxy.filters.cors import CorsFactory
from llmproxy.mock import MockServer

from ..support import RunningProxy, raw_exchange, status_of

Make = Callable[[dict[str, Any]], RunningProxy]
KEY = "sk-test-cors-9f8e7d6c5b"
PAGE = "http://localhost:3000"
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.6778.33 Safari/537.36"


def _preflight(port: int, origin: str, path: str = "/v1/chat/completions") -> str:
    return (
        f"OPTIONS {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Connection: close\r\n"
        "Accept: */*\r\n"
        "Access-Control-Request-Method: POST\r\n"
        "Access-Control-Request-Headers: authorization,content-type\r\n"
        f"Origin: {origin}\r\n"
        f"User-Agent: {UA}\r\n"
        "Sec-Fetch-Mode: cors\r\n"
        "Sec-Fetch-Site: same-site\r\n"
        "Sec-Fetch-Dest: empty\r\n"
        f"Referer: {origin}/\r\n"
        "Accept-Encoding: gzip, deflate, br, zstd\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n"
        "\r\n"
    )


def _fetch(port: int, origin: str, body: bytes, key: str = KEY) -> str:
    return (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n"
        'sec-ch-ua-platform: "Linux"\r\n'
        f"Authorization: Bearer {key}\r\n"
        'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"\r\n'
        "Content-Type: application/json\r\n"
        "sec-ch-ua-mobile: ?0\r\n"
        f"User-Agent: {UA}\r\n"
        "Accept: */*\r\n"
        f"Origin: {origin}\r\n"
        "Sec-Fetch-Site: same-site\r\n"
        "Sec-Fetch-Mode: cors\r\n"
        "Sec-Fetch-Dest: empty\r\n"
        f"Referer: {origin}/\r\n"
        "Accept-Encoding: gzip, deflate, br, zstd\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n"
        "Cookie: session=abc\r\n"
        "\r\n"
    ) + body.decode()


def _head(response: bytes) -> dict[str, str]:
    lines = response.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _config(port: int, cors: dict[str, Any] | None) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if cors is not None:
        filters.append({"name": "cors", "config": cors})
    filters += [
        {"name": "auth", "config": {"keys": [{"name": "page", "key_hash": hash_key(KEY)}]}},
        {
            "name": "routing",
            "config": {
                "providers": [
                    {
                        "name": "oa",
                        "type": "openai",
                        "base_url": f"http://127.0.0.1:{port}/v1",
                        "keys": ["sk-provider-1"],
                        "models": {"demo": "mock-gpt"},
                    }
                ]
            },
        },
    ]
    return {"filters": filters}


POLICY = {"origins": [PAGE, "https://*.example.com"], "allow_credentials": True, "max_age": 300}
CHAT = b'{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
STREAM = b'{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture
def cors(mock: MockServer, make_proxy: Make) -> RunningProxy:
    return make_proxy(_config(mock.port, POLICY))


def test_preflight_from_an_allowed_origin_is_answered_before_auth(cors: RunningProxy, mock: MockServer) -> None:
    response = raw_exchange(cors.port, _preflight(cors.port, PAGE).encode())
    head = _head(response)
    assert status_of(response) == 204
    assert head["access-control-allow-origin"] == PAGE
    assert head["access-control-allow-credentials"] == "true"
    assert "POST" in head["access-control-allow-methods"]
    allowed = {h.strip() for h in head["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert head["access-control-max-age"] == "300"
    assert "Origin" in head["vary"]
    assert mock.requests == []


def test_pattern_origin_matches_one_subdomain_level_or_more(cors: RunningProxy) -> None:
    for origin, ok in [
        ("https://app.example.com", True),
        ("https://a.b.example.com", True),
        ("https://example.com", False),
        ("http://app.example.com", False),
        ("https://app.example.com.evil.io", False),
    ]:
        head = _head(raw_exchange(cors.port, _preflight(cors.port, origin).encode()))
        assert (head.get("access-control-allow-origin") == origin) is ok, origin


def test_disallowed_origin_gets_no_cors_headers(cors: RunningProxy) -> None:
    evil = "http://evil.test"
    preflight = _head(raw_exchange(cors.port, _preflight(cors.port, evil).encode()))
    reply = raw_exchange(cors.port, _fetch(cors.port, evil, CHAT).encode())
    assert status_of(reply) == 200
    for head in (preflight, _head(reply)):
        assert not [k for k in head if k.startswith("access-control-")]


def test_credentialed_fetch_carries_cors_headers_json_and_stream(cors: RunningProxy) -> None:
    for body in (CHAT, STREAM):
        response = raw_exchange(cors.port, _fetch(cors.port, PAGE, body).encode())
        head = _head(response)
        assert status_of(response) == 200
        assert head["access-control-allow-origin"] == PAGE
        assert head["access-control-allow-credentials"] == "true"
        assert head["vary"] == "Origin"
        exposed = head["access-control-expose-headers"]
        assert (
            "x-request-id" in exposed and "x-llmproxy-cache" in exposed and "x-ratelimit-remaining-requests" in exposed
        )
    assert b"data: [DONE]" in response


def test_errors_and_local_replies_carry_cors_headers(cors: RunningProxy) -> None:
    refused = raw_exchange(cors.port, _fetch(cors.port, PAGE, CHAT, key="sk-test-wrong-000000").encode())
    assert status_of(refused) == 401
    assert _head(refused)["access-control-allow-origin"] == PAGE
    bad = raw_exchange(cors.port, _fetch(cors.port, PAGE, b'{"model":"nope","messages":[]}').encode())
    assert status_of(bad) >= 400 and _head(bad)["access-control-allow-origin"] == PAGE


def test_without_cors_a_preflight_is_405_and_no_headers(mock: MockServer, make_proxy: Make) -> None:
    config = _config(mock.port, None)
    authed = raw_exchange(make_proxy(config).port, _preflight(0, PAGE).encode())
    assert status_of(authed) == 401  # auth refuses the key-less preflight: cors must sit before it
    config["filters"] = config["filters"][1:]
    response = raw_exchange(make_proxy(config).port, _preflight(0, PAGE).encode())
    assert status_of(response) == 405
    assert "access-control-allow-origin" not in _head(response) and "access-control-allow-origin" not in _head(authed)
    assert _head(response)["allow"] == "POST"
    assert mock.requests == []


def _factory(config: dict[str, Any]) -> CorsFactory:
    return CorsFactory("cors", config, FactoryContext(MemoryStore()))


def test_wildcard_with_credentials_is_refused_at_config_time() -> None:
    with pytest.raises(ValueError, match="origins"):
        _factory({"origins": ["*"], "allow_credentials": True})
    with pytest.raises(ValueError, match="origins"):
        _factory({})
    with pytest.raises(ValueError, match="max_age"):
        _factory({"origins": [PAGE], "max_age": -1})
    with pytest.raises(ValueError, match="bogus"):
        _factory({"origins": [PAGE], "bogus": 1})
