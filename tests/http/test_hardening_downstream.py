"""Hardening of the client-facing HTTP side, over real sockets.

Each table is one class of defect: body timeouts, oversized chunks, clients
that stop reading, half-closed partial requests, request-target forms, Host
syntax, control characters, Transfer-Encoding in HTTP/1.0, strict chunked
framing, the smuggling defences, and rejections that never echo or log what
the client sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from llmproxy import Action, Exchange, Filter, FilterFactory
from llmproxy.mock import MockServer
from llmproxy.runtime.config import ConfigError, parse_config

from ..support import RunningProxy, status_of, talk

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
PATH = b"/v1/chat/completions"
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
#: A second, valid request pipelined after a bad one: it must never be answered.
PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
SECRET = b"sk-secret-123456"


def _cl(body: bytes = BODY) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def _good(head: bytes = HEAD, body: bytes = BODY) -> bytes:
    return head + b"Connection: close\r\n" + _cl(body) + b"\r\n" + body


def _chunked_body(body: bytes = BODY) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def _talk(port: int, data: bytes, shut: bool = False, timeout: float = 3.0) -> tuple[bytes, bool, float]:
    return talk(port, data, shut, timeout)


def _error(response: bytes) -> dict[str, Any]:
    body = response.partition(b"\r\n\r\n")[2]
    err: dict[str, Any] = json.loads(body)["error"]
    return err


@pytest.fixture
def strict(mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]) -> RunningProxy:
    return make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"max_body_bytes": 65536, "header_timeout": 5, "body_timeout": 0.3},
        }
    )


def _refused(port: int, data: bytes, status: int = 400, shut: bool = False) -> bytes:
    """The request gets exactly one response, with ``status``, and the connection is closed."""
    response, closed, elapsed = _talk(port, data, shut=shut)
    assert response, "no response"
    assert status_of(response) == status, response[:300]
    assert closed and elapsed < 2.0, "connection was not closed"
    assert response.count(b"HTTP/1.1 ") == 1, "a pipelined request after the bad one was answered"
    assert b'"error"' in response
    return response


# -- 1. request body timeout -----------------------------------------------------------

BODY_STALLS: list[tuple[str, bytes]] = [
    ("cl-no-body-byte", HEAD + _cl() + b"\r\n"),
    ("cl-part-of-body", HEAD + _cl() + b"\r\n" + BODY[:10]),
    ("chunked-no-body-byte", CHUNKED),
    ("chunked-size-line-unfinished", CHUNKED + b"3"),
    ("chunked-mid-chunk", CHUNKED + b"%x\r\n%s" % (len(BODY), BODY[:5])),
    ("chunked-between-chunks", CHUNKED + b"5\r\nhello\r\n"),
    ("chunked-before-chunk-crlf", CHUNKED + b"5\r\nhello"),
    ("chunked-in-trailers", CHUNKED + b"5\r\nhello\r\n0\r\nX-T: 1\r\n"),
]


@pytest.mark.parametrize(("name", "data"), BODY_STALLS, ids=[c[0] for c in BODY_STALLS])
def test_stalled_request_body_gets_408_then_close(
    name: str, data: bytes, strict: RunningProxy, mock: MockServer
) -> None:
    response, closed, elapsed = _talk(strict.port, data)
    assert status_of(response) == 408, response[:300]
    assert _error(response)["code"] == "request_timeout"
    assert closed and elapsed < 2.0
    assert mock.requests == []


def test_dribbled_body_is_timed_out_per_gap(strict: RunningProxy, mock: MockServer) -> None:
    """Bytes within ``body_timeout`` of each other keep the body alive; a longer gap ends it."""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
        sock.sendall(HEAD + _cl() + b"\r\n")
        for i in range(4):  # 4 x 0.15 s: longer than body_timeout in total, no gap longer
            time.sleep(0.15)
            sock.sendall(BODY[i : i + 1])
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert status_of(data) == 408
    assert time.monotonic() - started < 2.0
    assert mock.requests == []


def test_body_timeout_leaves_room_for_other_clients(
    mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"max_connections": 4, "body_timeout": 0.3},
        }
    )
    stalled = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(4)]
    try:
        for sock in stalled:
            sock.sendall(HEAD + _cl() + b"\r\n" + BODY[:3])
        time.sleep(0.6)
        response, _, _ = _talk(proxy.port, _good())
        assert status_of(response) == 200
    finally:
        for sock in stalled:
            sock.close()


class _SlowHeadersFilter(Filter):
    """Takes longer than the test's body_timeout in its request-headers hook."""

    async def on_request_headers(self, exchange: Exchange) -> Action:
        await asyncio.sleep(0.5)
        return Action.CONTINUE


class SlowHeadersFactory(FilterFactory):
    filter_class = _SlowHeadersFilter


def test_client_waiting_for_100_continue_is_timed_from_the_100(
    mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"body_timeout": 0.3},
            "filters": [{"name": "tests.http.test_hardening_downstream:SlowHeadersFactory"}],
        }
    )
    head = HEAD + b"Expect: 100-continue\r\nConnection: close\r\n" + _cl() + b"\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head)
        interim = sock.recv(65536)  # after the slow hook: longer than body_timeout
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(BODY)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert status_of(data) == 200, data[:300]
    # and one that gets its 100 Continue and then sends nothing is timed out
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert status_of(data) == 408
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_body_timeout_is_validated(value: object) -> None:
    with pytest.raises(ConfigError, match=r"limits\.body_timeout"):
        parse_config({"limits": {"body_timeout": value}}, "test.yaml")


def test_body_timeout_default_and_config() -> None:
    assert parse_config({}, "t.yaml").limits.body_timeout == 30.0
    assert parse_config({"limits": {"body_timeout": 2.5}}, "t.yaml").limits.body_timeout == 2.5


# -- 2. a chunk larger than the rest of the body limit: 413 at its size line ---------------

OVERSIZED_CHUNKS: list[tuple[str, bytes]] = [
    ("one-huge-chunk", CHUNKED + b"100000\r\n" + b"a" * 100),
    ("just-over-the-limit", CHUNKED + b"10001\r\n"),
    ("second-chunk-over-the-rest", CHUNKED + b"8000\r\n" + b"a" * 0x8000 + b"\r\n8001\r\n"),
    ("max-hex-digits", CHUNKED + b"ffffffffffffffff\r\n"),
    ("with-extension", CHUNKED + b"100000;name=value\r\n"),
]


@pytest.mark.parametrize(("name", "data"), OVERSIZED_CHUNKS, ids=[c[0] for c in OVERSIZED_CHUNKS])
def test_oversized_chunk_is_413_at_its_size_line(
    name: str, data: bytes, mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            # a long body timeout: only refusing at the size line answers in time
            "limits": {"max_body_bytes": 65536, "body_timeout": 10},
        }
    )
    response, closed, elapsed = _talk(proxy.port, data)
    assert status_of(response) == 413, response[:300]
    assert closed and elapsed < 2.0
    assert mock.requests == []


def test_chunks_up_to_the_limit_are_accepted(strict: RunningProxy, mock: MockServer) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (65536 - 61)}]}).encode()
    assert len(body) <= 65536
    half = len(body) // 2
    payload = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
    response, _, _ = _talk(strict.port, HEAD + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n" + payload)
    assert status_of(response) == 200
    assert len(mock.requests) == 1


# -- 3. a client that never reads frees its upstream connection ---------------------------


def test_client_that_never_reads_releases_the_upstream_slot(
    mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}", "timeouts": {"idle": 0.4}},
            "server": {"access_log": "off"},
            "pool": {"max_per_origin": 1},
        }
    )
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)  # before connect: no autotuning
    stalled.settimeout(5)
    stalled.connect(("127.0.0.1", proxy.port))
    with stalled:
        stalled.sendall(HEAD + b"X-Mock-Tokens: 100000\r\n" + _cl(body) + b"\r\n" + body)
        time.sleep(0.2)
        pool = proxy.runtime.pool
        assert any(p.active for p in pool._pools.values()), repr(pool)  # the stream holds the only slot
        # never read; after the idle timeout the slot is free for someone else
        response, _, elapsed = _talk(proxy.port, _good(), timeout=4)
        assert status_of(response) == 200, response[:300]
        assert elapsed < 3.0
        # the stalled client's connection was closed: reading drains what was queued, then EOF/reset
        deadline = time.monotonic() + 4
        closed = False
        while time.monotonic() < deadline:
            try:
                if not stalled.recv(1 << 20):
                    closed = True
                    break
            except ConnectionResetError:
                closed = True
                break
        assert closed, "the stalled client's connection was left open"
    assert len(mock.requests) == 2


# -- 4. EOF with a request unfinished: answered and closed at once -------------------------

HALF_CLOSED: list[tuple[str, bytes]] = [
    ("request-line-part", b"POST /v1/chat/compl"),
    ("request-line", b"POST /v1/chat/completions HTTP/1.1\r\n"),
    ("header-part", HEAD + b"X-A: 1"),
    ("head-without-final-crlf", HEAD + _cl() + b"\r"),
    ("cl-body-part", HEAD + _cl() + b"\r\n" + BODY[:10]),
    ("cl-no-body", HEAD + _cl() + b"\r\n"),
    ("chunked-no-body", CHUNKED),
    ("chunked-mid-chunk", CHUNKED + b"5\r\nhel"),
    ("chunked-no-last-chunk", CHUNKED + b"5\r\nhello\r\n"),
    ("chunked-in-trailers", CHUNKED + b"0\r\nX-T: 1\r\n"),
]


@pytest.mark.parametrize(("name", "data"), HALF_CLOSED, ids=[c[0] for c in HALF_CLOSED])
def test_half_closed_unfinished_request_is_closed_at_once(
    name: str, data: bytes, mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"header_timeout": 5, "body_timeout": 5},
        }
    )
    response, closed, elapsed = _talk(proxy.port, data, shut=True)
    assert closed and elapsed < 1.0, f"held for {elapsed:.2f} s"
    assert status_of(response) == 400
    assert mock.requests == []


def test_half_closed_after_a_whole_request_and_a_partial_one(strict: RunningProxy, mock: MockServer) -> None:
    request = HEAD + _cl() + b"\r\n" + BODY
    response, closed, elapsed = _talk(strict.port, request + b"POST /v1/chat", shut=True)
    assert status_of(response) == 200
    assert closed and elapsed < 1.0
    assert len(mock.requests) == 1


def test_half_closed_after_whole_requests_closes_after_the_last_response(
    strict: RunningProxy, mock: MockServer
) -> None:
    request = HEAD + _cl() + b"\r\n" + BODY
    response, closed, elapsed = _talk(strict.port, request * 2, shut=True)
    assert response.count(b"HTTP/1.1 200") == 2
    assert closed and elapsed < 1.0  # not kept for the keep-alive timeout
    assert len(mock.requests) == 2


# -- 5. request-target forms --------------------------------------------------------------

ABSOLUTE_FORMS: list[tuple[str, bytes, str]] = [
    ("http", b"http://proxy/v1/chat/completions", "/v1/chat/completions"),
    ("https", b"https://api.example.com/v1/chat/completions", "/v1/chat/completions"),
    ("scheme-uppercase", b"HTTP://proxy/v1/chat/completions", "/v1/chat/completions"),
    ("with-port", b"http://proxy:8080/v1/chat/completions", "/v1/chat/completions"),
    ("with-query", b"http://proxy/v1/chat/completions?x=1", "/v1/chat/completions?x=1"),
    ("ipv6", b"http://[::1]:80/v1/chat/completions", "/v1/chat/completions"),
]


@pytest.mark.parametrize(("name", "target", "path"), ABSOLUTE_FORMS, ids=[c[0] for c in ABSOLUTE_FORMS])
def test_absolute_form_target_is_routed_by_its_path(
    name: str, target: bytes, path: str, strict: RunningProxy, mock: MockServer
) -> None:
    head = b"POST %s HTTP/1.1\r\nHost: other\r\n" % target
    response, _, _ = _talk(strict.port, _good(head))
    assert status_of(response) == 200, response[:300]
    assert mock.requests[-1].path == path.split("?")[0]  # the mock records the path alone


def test_absolute_form_with_empty_host_and_healthz(strict: RunningProxy) -> None:
    response, _, _ = _talk(strict.port, _good(b"POST http://proxy/v1/chat/completions HTTP/1.1\r\nHost:\r\n"))
    assert status_of(response) == 200
    response, _, _ = _talk(
        strict.port, b"GET http://proxy/healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) == 200


BAD_TARGETS: list[tuple[str, bytes]] = [
    ("authority-form", b"CONNECT proxy:443 HTTP/1.1\r\nHost: proxy:443\r\n\r\n"),
    ("authority-form-post", b"POST proxy:443 HTTP/1.1\r\nHost: proxy\r\n" + _cl() + b"\r\n" + BODY),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("relative-path", b"POST v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + _cl() + b"\r\n" + BODY),
    ("double-slash", b"POST //v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + _cl() + b"\r\n" + BODY),
    ("dot-path", b"GET ./v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("query-only", b"GET ?x=1 HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("fragment", b"GET /v1/models#frag HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("other-scheme", b"GET ftp://proxy/v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("no-authority", b"GET http:///v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("scheme-only", b"GET http:// HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("userinfo", b"GET http://user:pw@proxy/v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("bad-authority", b"GET http://pro%xy/v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("absolute-double-slash", b"GET http://proxy//v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("absolute-fragment", b"GET http://proxy/v1/models#f HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("scheme-relative", b"GET //proxy/v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"),
]


@pytest.mark.parametrize(("name", "data"), BAD_TARGETS, ids=[c[0] for c in BAD_TARGETS])
def test_bad_request_target_is_400_and_close(name: str, data: bytes, strict: RunningProxy, mock: MockServer) -> None:
    _refused(strict.port, data + PIPELINED)
    assert mock.requests == []


# -- 6. Host syntax ---------------------------------------------------------------------------

GOOD_HOSTS = [b"proxy", b"api.example.com:8080", b"127.0.0.1", b"[::1]:80", b"[v1.x]", b"xn--bcher-kva.example", b"a_b"]


@pytest.mark.parametrize("host", GOOD_HOSTS, ids=[h.decode() for h in GOOD_HOSTS])
def test_valid_host_is_accepted(host: bytes, strict: RunningProxy) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n" % host
    response, _, _ = _talk(strict.port, _good(head))
    assert status_of(response) == 200, response[:300]


def test_http10_without_host_is_accepted(strict: RunningProxy) -> None:
    response, _, _ = _talk(strict.port, b"POST /v1/chat/completions HTTP/1.0\r\n" + _cl() + b"\r\n" + BODY)
    assert status_of(response) == 200


BAD_HOSTS: list[tuple[str, bytes]] = [
    ("space-inside", b"Host: a b\r\n"),
    ("slash", b"Host: a/b\r\n"),
    ("userinfo", b"Host: user@a\r\n"),
    ("port-not-digits", b"Host: a:http\r\n"),
    ("port-too-long", b"Host: a:123456\r\n"),
    ("empty-port", b"Host: a:\r\n"),
    ("two-ports", b"Host: a:1:2\r\n"),
    ("unclosed-ipv6", b"Host: [::1\r\n"),
    ("ipv6-unbracketed-junk", b"Host: [::1]x\r\n"),
    ("quote", b'Host: "a"\r\n'),
    ("list", b"Host: a, b\r\n"),
    ("bad-percent", b"Host: a%zz\r\n"),
    ("query", b"Host: a?b\r\n"),
    ("empty-with-origin-form", b"Host:\r\n"),
    ("blank-with-origin-form", b"Host:   \r\n"),
    ("two-hosts-same", b"Host: a\r\nHost: a\r\n"),
    ("two-hosts-differ", b"Host: a\r\nHost: b\r\n"),
    ("two-hosts-cased", b"Host: a\r\nhOST: b\r\n"),
]


@pytest.mark.parametrize(("name", "host"), BAD_HOSTS, ids=[c[0] for c in BAD_HOSTS])
def test_invalid_host_is_400_and_close(name: str, host: bytes, strict: RunningProxy, mock: MockServer) -> None:
    data = b"POST /v1/chat/completions HTTP/1.1\r\n" + host + _cl() + b"\r\n" + BODY
    _refused(strict.port, data + PIPELINED)
    assert mock.requests == []


# -- 7. control characters in the head ---------------------------------------------------------

CONTROL_BYTES = [*range(0x00, 0x09), *range(0x0B, 0x0D), *range(0x0E, 0x20), 0x7F]


@pytest.mark.parametrize("byte", CONTROL_BYTES, ids=[f"0x{b:02x}" for b in CONTROL_BYTES])
@pytest.mark.parametrize("where", ["value", "value-end", "name", "target", "method"])
def test_control_character_is_400_and_close(byte: int, where: str, strict: RunningProxy, mock: MockServer) -> None:
    c = bytes([byte])
    if where == "value":
        data = HEAD + b"X-A: a" + c + b"b\r\n"
    elif where == "value-end":
        data = HEAD + b"X-A: ab" + c + b"\r\n"
    elif where == "name":
        data = HEAD + b"X-" + c + b"A: ab\r\n"
    elif where == "target":
        data = b"POST /v1/chat/completions?x=" + c + b" HTTP/1.1\r\nHost: proxy\r\n"
    else:
        data = b"PO" + c + b"ST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
    _refused(strict.port, data + _cl() + b"\r\n" + BODY + PIPELINED)
    assert mock.requests == []


def test_htab_and_obs_text_in_a_value_are_accepted(strict: RunningProxy, mock: MockServer) -> None:
    response, _, _ = _talk(strict.port, _good(HEAD + b"X-A: a\tb\xe9\r\n"))
    assert status_of(response) == 200
    assert mock.requests[-1].headers["x-a"] == "a\tb\xe9"


# -- 8. Transfer-Encoding in HTTP/1.0 ------------------------------------------------------------

HTTP10_TE: list[tuple[str, bytes]] = [
    ("chunked", b"Transfer-Encoding: chunked\r\n\r\n" + _chunked_body()),
    ("chunked-upper", b"TRANSFER-ENCODING: CHUNKED\r\n\r\n" + _chunked_body()),
    ("identity", b"Transfer-Encoding: identity\r\n\r\n"),
    ("with-content-length", b"Transfer-Encoding: chunked\r\n" + _cl() + b"\r\n" + BODY),
]


@pytest.mark.parametrize(("name", "rest"), HTTP10_TE, ids=[c[0] for c in HTTP10_TE])
def test_transfer_encoding_in_http10_is_400_and_close(
    name: str, rest: bytes, strict: RunningProxy, mock: MockServer
) -> None:
    response = _refused(strict.port, b"POST /v1/chat/completions HTTP/1.0\r\nHost: proxy\r\n" + rest)
    assert mock.requests == []
    assert b"HTTP/1.1 400" in response


# -- 9. strict chunked request bodies ---------------------------------------------------------------

GOOD_CHUNKED: list[tuple[str, bytes]] = [
    ("plain", _chunked_body()),
    ("upper-hex", b"%X\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ("leading-zeros", b"%04x\r\n%s\r\n0000\r\n\r\n" % (len(BODY), BODY)),
    ("extension", b"%x;name\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ("extension-value", b"%x;name=value;other=1\r\n%s\r\n0;last=yes\r\n\r\n" % (len(BODY), BODY)),
    ("extension-bws", b"%x ; name = value\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ("extension-quoted", b'%x;name="a \\"q\\" ;=b"\r\n%s\r\n0\r\n\r\n' % (len(BODY), BODY)),
    ("trailers", _chunked_body()[:-2] + b"X-Trailer: 1\r\nX-Other: two\r\n\r\n"),
    ("one-byte-chunks", b"".join(b"1\r\n%s\r\n" % BODY[i : i + 1] for i in range(len(BODY))) + b"0\r\n\r\n"),
]


@pytest.mark.parametrize(("name", "payload"), GOOD_CHUNKED, ids=[c[0] for c in GOOD_CHUNKED])
def test_well_formed_chunked_body_is_accepted(
    name: str, payload: bytes, strict: RunningProxy, mock: MockServer
) -> None:
    head = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    response, closed, _ = _talk(strict.port, head + payload + _good(), timeout=2)
    assert response.count(b"HTTP/1.1 200") == 2, response[:300]  # and the pipelined next request
    assert closed
    assert mock.requests[0].body == json.loads(BODY)


def test_chunked_body_split_at_every_byte(strict: RunningProxy, mock: MockServer) -> None:
    payload = CHUNKED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + (
        b"%x;a=b\r\n%s\r\n0\r\nX-T: 1\r\n\r\n" % (len(BODY), BODY)
    )
    head_end = payload.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(payload[:head_end])
        for i in range(head_end, len(payload)):
            sock.sendall(payload[i : i + 1])
            if i % 8 == 0:
                time.sleep(0.002)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert status_of(data) == 200
    assert mock.requests[0].body == json.loads(BODY)


MALFORMED_CHUNKED: list[tuple[str, bytes]] = [
    ("size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("size-empty", b"\r\nhello\r\n0\r\n\r\n"),
    ("size-negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("size-plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("size-0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("size-trailing-space", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("size-overflow", b"fffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("size-17-digits", b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
    ("size-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    ("size-bare-cr", b"5\rhello\r\n0\r\n\r\n"),
    ("size-ctl", b"5\x00\r\nhello\r\n0\r\n\r\n"),
    ("size-line-too-long", b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n"),
    ("ext-empty-name", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("ext-name-missing", b"5;=v\r\nhello\r\n0\r\n\r\n"),
    ("ext-value-missing", b"5;a=\r\nhello\r\n0\r\n\r\n"),
    ("ext-space-in-name", b"5;a b\r\nhello\r\n0\r\n\r\n"),
    ("ext-space-in-value", b"5;a=b c\r\nhello\r\n0\r\n\r\n"),
    ("ext-unterminated-quote", b'5;a="bc\r\nhello\r\n0\r\n\r\n'),
    ("ext-ctl", b"5;a=\x01\r\nhello\r\n0\r\n\r\n"),
    ("ext-del", b"5;a\x7f\r\nhello\r\n0\r\n\r\n"),
    ("ext-bare-lf-inside", b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
    ("ext-no-semicolon", b"5 a\r\nhello\r\n0\r\n\r\n"),
    ("data-too-long", b"5\r\nhelloXX\r\n0\r\n\r\n"),
    ("data-bare-lf", b"5\r\nhello\n0\r\n\r\n"),
    ("data-bare-cr", b"5\r\nhello\r0\r\n\r\n"),
    ("data-no-crlf", b"5\r\nhello0\r\n\r\n"),
    ("last-chunk-bare-lf", b"5\r\nhello\r\n0\n\n"),
    ("trailer-not-a-field", b"5\r\nhello\r\n0\r\nnot a field\r\n\r\n"),
    ("trailer-space-before-colon", b"5\r\nhello\r\n0\r\nX-T : 1\r\n\r\n"),
    ("trailer-obs-fold", b"5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"),
    ("trailer-ctl", b"5\r\nhello\r\n0\r\nX-T: a\x01b\r\n\r\n"),
    ("trailer-bare-lf", b"5\r\nhello\r\n0\r\nX-T: 1\nX-U: 2\r\n\r\n"),
    ("trailer-too-large", b"5\r\nhello\r\n0\r\n" + b"X-T: " + b"a" * 20000 + b"\r\n\r\n"),
]


@pytest.mark.parametrize(("name", "payload"), MALFORMED_CHUNKED, ids=[c[0] for c in MALFORMED_CHUNKED])
def test_malformed_chunked_body_is_400_and_close(
    name: str, payload: bytes, mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            # a long body timeout: a hang is not mistaken for a refusal
            "limits": {"max_body_bytes": 65536, "body_timeout": 10, "header_timeout": 10},
        }
    )
    response = _refused(proxy.port, CHUNKED + payload + PIPELINED)
    assert _error(response)["type"] == "invalid_request_error"
    assert mock.requests == []


# -- smuggling defences: every one refused, and the connection closed -------------------------------

SMUGGLING: list[tuple[str, bytes, int]] = [
    ("cl-and-te", HEAD + _cl() + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked_body(), 400),
    ("te-and-cl", HEAD + b"Transfer-Encoding: chunked\r\n" + _cl() + b"\r\n" + _chunked_body(), 400),
    ("cl-zero-and-te", HEAD + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("duplicate-differing-cl", HEAD + _cl() + b"Content-Length: 3\r\n\r\n" + BODY, 400),
    ("cl-list-differing", HEAD + b"Content-Length: %d, 3\r\n\r\n" % len(BODY) + BODY, 400),
    ("cl-plus", HEAD + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-hex", HEAD + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-negative", HEAD + b"Content-Length: -5\r\n\r\nhello", 400),
    ("cl-space-inside", HEAD + b"Content-Length: 5 5\r\n\r\nhello", 400),
    ("cl-empty", HEAD + b"Content-Length:\r\n\r\n", 400),
    ("te-chunked-identity", HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("te-identity-chunked", HEAD + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-twice", HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-space-before-colon", HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("cl-space-before-colon", HEAD + b"Content-Length : 5\r\n\r\nhello", 400),
    ("te-tab-before-colon", HEAD + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obfuscated", HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-quoted", HEAD + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n', 400),
    ("te-vertical-tab", HEAD + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold", HEAD + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", HEAD + b"X-Long: a\r\n  continued\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("obs-fold-tab", HEAD + b"X-Long: a\r\n\tcontinued\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("bare-lf-everywhere", b"POST /v1/chat/completions HTTP/1.1\nHost: proxy\n" + _cl() + b"\n" + BODY, 400),
    ("bare-lf-one-line", HEAD + b"X-A: 1\n" + _cl() + b"\r\n" + BODY, 400),
    ("bare-lf-head-end", HEAD + _cl() + b"\n\n" + BODY, 400),
    ("bare-cr", HEAD + b"X-A: 1\rX-B: 2\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("bare-cr-before-te", HEAD + b"X-A: 1\rTransfer-Encoding: chunked\r\n" + _cl() + b"\r\n" + BODY, 400),
    ("too-many-headers", HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    ("head-too-large", HEAD + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ("cl-too-large", HEAD + b"Content-Length: 999999999\r\n\r\n", 413),
]


@pytest.mark.parametrize(("name", "data", "status"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_smuggling_vector_is_refused_and_the_connection_closed(
    name: str, data: bytes, status: int, strict: RunningProxy, mock: MockServer
) -> None:
    _refused(strict.port, data + PIPELINED, status)
    assert mock.requests == []


# -- 10. rejections never echo or log request bytes ------------------------------------------------

SECRET_HEADS: list[tuple[str, bytes]] = [
    ("ctl-in-auth-value", HEAD + b"Authorization: Bearer " + SECRET + b"\x01\r\n" + _cl() + b"\r\n" + BODY),
    ("del-in-auth-value", HEAD + b"Authorization: Bearer " + SECRET + b"\x7f\r\n" + _cl() + b"\r\n" + BODY),
    ("nul-in-auth-value", HEAD + b"Authorization: Bearer " + SECRET + b"\x00\r\n" + _cl() + b"\r\n" + BODY),
    ("space-in-name", HEAD + b"X Api Key: " + SECRET + b"\r\n" + _cl() + b"\r\n" + BODY),
    ("no-colon", HEAD + b"Authorization Bearer " + SECRET + b"\r\n" + _cl() + b"\r\n" + BODY),
    ("bad-request-line", b"POST /v1/chat/completions?key=" + SECRET + b" HTTP/1.1 extra\r\nHost: proxy\r\n\r\n"),
    ("bad-target", b"GET " + SECRET + b" HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("ctl-in-target", b"GET /v1/models?key=" + SECRET + b"\x01 HTTP/1.1\r\nHost: proxy\r\n\r\n"),
    ("bad-host", HEAD.replace(b"Host: proxy", b"Host: " + SECRET + b" x") + b"\r\n"),
    ("bad-content-length", HEAD + b"Content-Length: " + SECRET + b"\r\n\r\n"),
    ("bad-transfer-encoding", HEAD + b"Transfer-Encoding: " + SECRET + b"\r\n\r\n"),
    ("bad-chunk-line", CHUNKED + SECRET + b"\r\nhello\r\n0\r\n\r\n"),
    ("bad-chunk-extension", CHUNKED + b"5;" + SECRET + b" x\r\nhello\r\n0\r\n\r\n"),
    ("bad-trailer", CHUNKED + b"5\r\nhello\r\n0\r\n" + SECRET + b"\r\n\r\n"),
    ("obs-fold-secret", HEAD + b"Authorization: Bearer\r\n " + SECRET + b"\r\n\r\n"),
    ("bare-lf-secret", HEAD + b"Authorization: Bearer " + SECRET + b"\n\r\n"),
    ("unknown-path-query", b"GET /v1/nope?key=" + SECRET + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"),
]


@pytest.mark.parametrize(("name", "data"), SECRET_HEADS, ids=[c[0] for c in SECRET_HEADS])
def test_rejection_never_echoes_or_logs_request_bytes(
    name: str,
    data: bytes,
    mock: MockServer,
    make_proxy: Callable[[dict[str, Any]], RunningProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "server": {"access_log": "text"}})
    caplog.set_level(logging.DEBUG)
    response, closed, _ = _talk(proxy.port, data)
    assert closed
    assert 400 <= status_of(response) < 500, response[:300]
    assert SECRET not in response
    time.sleep(0.05)  # log records of the loop thread
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert SECRET.decode() not in logged
    message = _error(response)["message"]
    assert "\\x" not in message and "b'" not in message and 'b"' not in message, message
