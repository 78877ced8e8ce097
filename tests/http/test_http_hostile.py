"""Malformed and hostile requests over a raw socket: each gets its status and
never reaches the upstream."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from llmproxy.mock import MockServer

from ..support import RunningProxy, raw_exchange, status_of

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
GOOD_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"


def _cl(body: bytes = BODY) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


HOSTILE: list[tuple[str, bytes, int]] = [
    ("cl-and-te", GOOD_HEAD + _cl() + b"Transfer-Encoding: chunked\r\n\r\n" + BODY, 400),
    ("te-and-cl", GOOD_HEAD + b"Transfer-Encoding: chunked\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("differing-cl", GOOD_HEAD + _cl() + b"Content-Length: 3\r\n\r\n" + BODY, 400),
    ("cl-list-differing", GOOD_HEAD + b"Content-Length: %d, 3\r\n\r\n" % len(BODY) + BODY, 400),
    ("cl-not-digits", GOOD_HEAD + b"Content-Length: 0x10\r\n\r\n" + BODY, 400),
    ("cl-negative", GOOD_HEAD + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-plus", GOOD_HEAD + b"Content-Length: +5\r\n\r\n" + BODY, 400),
    ("te-gzip-chunked", GOOD_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-not-last", GOOD_HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("te-twice", GOOD_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-identity", GOOD_HEAD + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-obfuscated", GOOD_HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("bad-chunk-size", GOOD_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-negative", GOOD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-missing-crlf", GOOD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400),
    ("obs-fold", GOOD_HEAD + b"X-Long: a\r\n  continued\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("obs-fold-tab", GOOD_HEAD + b"X-Long: a\r\n\tcontinued\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("bare-lf", b"POST /v1/chat/completions HTTP/1.1\nHost: proxy\n" + _cl() + b"\n" + BODY, 400),
    ("bare-lf-one-line", GOOD_HEAD + b"X-A: 1\n" + _cl() + b"\r\n" + BODY, 400),
    ("bare-cr", GOOD_HEAD + b"X-A: 1\rX-B: 2\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("space-before-colon", GOOD_HEAD + b"Content-Length : %d\r\n\r\n" % len(BODY) + BODY, 400),
    ("tab-before-colon", GOOD_HEAD + b"X-A\t: 1\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("empty-header-name", GOOD_HEAD + b": value\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("nul-in-value", GOOD_HEAD + b"X-A: a\x00b\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("bad-request-line", b"POST  /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("no-host", b"POST /v1/chat/completions HTTP/1.1\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("header-too-large", GOOD_HEAD + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ("too-many-headers", GOOD_HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    ("body-too-large-cl", GOOD_HEAD + b"Content-Length: 999999999\r\n\r\n", 413),
    (
        "body-too-large-chunked",
        GOOD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + (b"1000\r\n" + b"a" * 4096 + b"\r\n") * 20,
        413,
    ),
    (
        "bad-json",
        GOOD_HEAD + b"Connection: close\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\n{bad}",
        400,
    ),
    ("unknown-path", b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", 404),
    ("wrong-method", b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
]


@pytest.fixture
def strict_proxy(mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]) -> RunningProxy:
    return make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"max_body_bytes": 65536, "header_timeout": 0.3, "max_header_bytes": 16384},
        }
    )


@pytest.mark.parametrize(("name", "request_bytes", "status"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_is_refused(
    name: str, request_bytes: bytes, status: int, strict_proxy: RunningProxy, mock: MockServer
) -> None:
    started = time.monotonic()
    response = raw_exchange(strict_proxy.port, request_bytes)
    assert time.monotonic() - started < 2.0, f"{name}: connection was not closed"
    assert response, f"{name}: no response"
    assert status_of(response) == status, response[:300]
    head, _, body = response.partition(b"\r\n\r\n")
    assert b'"error"' in body and b'"message"' in body and b'"type"' in body, body
    assert b"Traceback" not in response
    assert mock.requests == [], f"{name} reached the upstream"
    assert head.count(b"\r\n") >= 2


def test_slowloris_gets_408_then_close(strict_proxy: RunningProxy, mock: MockServer) -> None:
    with socket.create_connection(("127.0.0.1", strict_proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(3):
            time.sleep(0.05)
            sock.sendall(b"X-Drip: 1\r\n")
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert status_of(data) == 408
        assert time.monotonic() - started < 2.0
    assert mock.requests == []


def test_idle_connection_without_bytes_is_closed_silently(strict_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", strict_proxy.port), timeout=5) as sock:
        assert sock.recv(100) == b""  # closed after header_timeout, nothing sent


def test_framing_error_closes_connection(strict_proxy: RunningProxy) -> None:
    payload = GOOD_HEAD + _cl() + b"Transfer-Encoding: chunked\r\n\r\n" + BODY
    with socket.create_connection(("127.0.0.1", strict_proxy.port), timeout=5) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert status_of(data) == 400
        assert data.count(b"HTTP/1.1") == 1  # the smuggled remainder was not served


def test_smuggled_pipelined_request_is_not_served(strict_proxy: RunningProxy, mock: MockServer) -> None:
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    attack = GOOD_HEAD + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled
    response = raw_exchange(strict_proxy.port, attack)
    assert status_of(response) == 400
    assert response.count(b"HTTP/1.1 ") == 1
    assert mock.requests == []


def test_max_connections(mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"max_connections": 2},
        }
    )
    keep = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
    try:
        time.sleep(0.05)
        response = raw_exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 503
    finally:
        for sock in keep:
            sock.close()
    time.sleep(0.05)
    assert status_of(raw_exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200
