"""HTTP/1.1 behaviour of the proxy over raw sockets: keep-alive, pipelining,
chunked bodies, 100-continue, HEAD, header handling, flow control, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmproxy.mock import MockServer

from ..support import LoopThread, RunningProxy, raw_exchange, status_of

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def _request(body: bytes = BODY, extra: bytes = b"", path: bytes = b"/v1/chat/completions") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path,
        len(body),
        extra,
        body,
    )


class Reader:
    """Reads HTTP/1.1 responses (Content-Length or chunked) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        status = int(self._line().split(b" ")[1])
        headers: dict[str, str] = {}
        while line := self._line():
            k, v = line.split(b":", 1)
            headers[k.decode().lower()] = v.decode().strip()
        if head_only or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._exact(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while True:
            size = int(self._line(), 16)
            if size == 0:
                self._line()
                return status, headers, body
            body += self._exact(size)
            self._exact(2)


def test_keep_alive_reuses_both_connections(proxy: RunningProxy, mock: MockServer) -> None:
    upstream_conns = set()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        reader = Reader(sock)
        for _ in range(5):
            sock.sendall(_request())
            status, _headers, body = reader.response()
            assert status == 200
            assert json.loads(body)["object"] == "chat.completion"
            time.sleep(0.01)
            origin = next(iter(proxy.runtime.pool._pools.values()))
            upstream_conns.update(id(c) for c in origin.idle)
    assert len(upstream_conns) == 1, "the upstream connection was not reused"
    assert len(mock.requests) == 5


def test_pipelined_requests_answered_in_order(proxy: RunningProxy, mock: MockServer) -> None:
    bodies = [json.dumps({"model": f"model-{i}", "messages": []}).encode() for i in range(4)]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"".join(_request(b, b"X-Mock-Tokens: %d\r\n" % (i + 1)) for i, b in enumerate(bodies)))
        reader = Reader(sock)
        for i in range(4):
            status, _, body = reader.response()
            assert status == 200
            assert json.loads(body)["model"] == f"model-{i}"
    assert [r.model for r in mock.requests] == [f"model-{i}" for i in range(4)]


def test_chunked_request_body(proxy: RunningProxy, mock: MockServer) -> None:
    chunks = [BODY[:10], BODY[10:30], BODY[30:]]
    payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    response = raw_exchange(proxy.port, head + payload)
    assert status_of(response) == 200
    assert mock.requests[-1].body == json.loads(BODY)
    assert mock.requests[-1].headers["content-length"] == str(len(BODY))
    assert "transfer-encoding" not in mock.requests[-1].headers


def test_expect_100_continue(proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
            % len(BODY)
        )
        sock.sendall(head)
        reader = Reader(sock)
        status, _, _ = reader.response(head_only=True)
        assert status == 100
        sock.sendall(BODY)
        status, _, body = reader.response()
        assert status == 200 and b"chat.completion" in body


class _ScriptedUpstream(asyncio.Protocol):
    """Answers by path: HEAD-able /v1/models, 204 / 304 statuses chosen by a header, and
    misbehaving Content-Length replies (``x-script``: ``extra``, ``close``, ``cut``)."""

    connections: list[int] = []  # accepted connections, across instances

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        _ScriptedUpstream.connections.append(1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, value = line.split(b":", 1)
                if name.lower() == b"content-length":
                    length = int(value)
            self.buf = self.buf[length:]
            body = b'{"object":"list","data":[]}'
            ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            if b"x-script: extra" in head.lower():  # more bytes than its Content-Length
                self.transport.write(ok + b"content-length: %d\r\n\r\n%sGARBAGE" % (len(body), body))
            elif b"x-script: close" in head.lower():
                self.transport.write(ok + b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()
            elif b"x-script: cut-text" in head.lower():  # not JSON: closes after 10 of 100 promised bytes
                text = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                self.transport.write(text + b"content-length: 100\r\n\r\n" + body[:10])
                self.transport.close()
            elif b"x-script: cut" in head.lower():  # closes after 10 of 100 promised bytes
                self.transport.write(ok + b"content-length: 100\r\n\r\n" + body[:10])
                self.transport.close()
            elif b"x-status: 204" in head.lower():
                self.transport.write(b"HTTP/1.1 204 No Content\r\nx-kind: empty\r\n\r\n")
            elif b"x-status: 304" in head.lower():
                self.transport.write(b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\n\r\n')
            elif head.startswith(b"HEAD "):
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 42\r\n\r\n")
            else:
                body = b'{"object":"list","data":[]}'
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body)
                )


@pytest.fixture
def scripted_proxy(
    loop_thread: LoopThread, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> Iterator[RunningProxy]:
    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_ScriptedUpstream, "127.0.0.1", 0)

    server = loop_thread.call(start())
    yield make_proxy({"upstream": {"url": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"}})
    server.close()


def test_head_request(scripted_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", scripted_proxy.port), timeout=5) as sock:
        sock.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: p\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
        reader = Reader(sock)
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and headers["content-length"] == "42"
        status, _, body = reader.response()  # follows at once: the HEAD response had no body
        assert status == 200 and body == b'{"object":"list","data":[]}'


@pytest.mark.parametrize("code", [204, 304])
def test_bodiless_statuses(scripted_proxy: RunningProxy, code: int) -> None:
    with socket.create_connection(("127.0.0.1", scripted_proxy.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Status: %d\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n"
            % code
        )
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == code and body == b""
        assert "transfer-encoding" not in headers
        status, _, body = reader.response()
        assert status == 200 and body.startswith(b'{"object"')


def test_healthz_touches_no_filter(mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]) -> None:
    from ..filters_for_tests import CALLS

    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "filters": [{"name": "tests.filters_for_tests:RecorderFactory", "config": {"tag": "healthz"}}],
        }
    )
    response = raw_exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert not [c for c in CALLS if c[0] == "healthz"]
    assert mock.requests == []


def test_forwarded_headers(proxy: RunningProxy, mock: MockServer) -> None:
    extra = (
        b"Authorization: Bearer sk-client\r\nX-Api-Key: sk-client2\r\nConnection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: x\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nX-Request-Id: my-request-42\r\nX-Custom: kept\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_request(extra=extra))
        status, headers, _ = Reader(sock).response()
    assert status == 200
    assert headers["x-request-id"] == "my-request-42"
    got = mock.requests[-1].headers
    for hop in (
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "x-secret-hop",
        "authorization",
        "x-api-key",
    ):
        assert hop not in got, hop
    assert got["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert got["x-request-id"] == "my-request-42"
    assert got["x-custom"] == "kept"
    assert got["host"] == f"127.0.0.1:{mock.port}"


def test_request_id_generated_when_absent(proxy: RunningProxy, mock: MockServer) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_request())
        _, headers, _ = Reader(sock).response()
    assert headers["x-request-id"] and headers["x-request-id"] == mock.requests[-1].headers["x-request-id"]


def test_upstream_headers_injected(mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]) -> None:
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{mock.port}", "headers": {"authorization": "Bearer sk-provider"}}}
    )
    response = raw_exchange(proxy.port, _request(extra=b"Authorization: Bearer sk-client\r\nConnection: close\r\n"))
    assert status_of(response) == 200
    assert mock.requests[-1].credential == "sk-provider"


def _stream_request(extra: bytes = b"") -> bytes:
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    return _request(body, extra)


def test_sse_events_forwarded_as_they_arrive(proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_stream_request(b"X-Mock-Tokens: 5\r\nX-Mock-Itl-Ms: 100\r\n"))
        arrivals = []
        data = b""
        started = time.monotonic()
        while b"[DONE]" not in data:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
            arrivals.append(time.monotonic() - started)
    # 5 tokens 100 ms apart arrive spread out, not batched at the end
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] > 0.3


def test_slow_reader_applies_backpressure(proxy: RunningProxy) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # before connect: no autotuning
    sock.settimeout(10)
    sock.connect(("127.0.0.1", proxy.port))
    with sock:
        sock.sendall(_stream_request(b"X-Mock-Tokens: 100000\r\n"))
        # read nothing: the proxy must stop reading the upstream (polled: a loaded machine is slow
        # to fill the buffers, and a proxy that never pauses still fails at the deadline)
        pool = proxy.runtime.pool
        deadline = time.monotonic() + 10.0
        while True:
            time.sleep(0.2)
            conns = [c for p in pool._pools.values() for c in p.active]
            if (conns and any(c._reading_paused for c in conns)) or time.monotonic() > deadline:
                break
        assert conns and any(c._reading_paused for c in conns), repr(pool)
        buffered = sum(c._buffered for c in conns)
        assert buffered < 2 * 1024 * 1024
        data = bytearray()
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(1 << 20)
            assert chunk
            data += chunk
        assert len(data) > 5_000_000 and b"[DONE]" in data[-200:]


def test_client_disconnect_closes_upstream_and_runs_end_hook_once(
    mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    from ..filters_for_tests import CALLS

    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "filters": [{"name": "tests.filters_for_tests:RecorderFactory", "config": {"tag": "disconnect"}}],
        }
    )
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(_stream_request(b"X-Mock-Tokens: 1000\r\nX-Mock-Itl-Ms: 20\r\n"))
    assert b"data:" in sock.recv(65536)
    sock.close()
    pool = proxy.runtime.pool
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline:
        if all(not p.active and not p.idle for p in pool._pools.values()):
            break
        time.sleep(0.005)
    assert all(not p.active and not p.idle for p in pool._pools.values()), repr(pool)
    time.sleep(0.05)
    completes = [c for c in CALLS if c[0] == "disconnect" and c[1].startswith("complete")]
    assert completes == [("disconnect", "complete:client_closed_request", completes[0][2])]


def test_stalled_stream_cut_by_idle_timeout(
    mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]
) -> None:
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}", "timeouts": {"idle": 0.3}}})
    started = time.monotonic()
    response = raw_exchange(
        proxy.port, _stream_request(b"X-Mock-Fault: stall\r\nX-Mock-Stall-After: 2\r\nConnection: close\r\n")
    )
    assert time.monotonic() - started < 3
    assert status_of(response) == 200
    events = [e for e in response.split(b"\n\n") if b"data:" in e]
    assert len(events) >= 3
    last = events[-1][events[-1].index(b"data: ") + 6 :]
    err = json.loads(last)["error"]
    assert err["code"] == "upstream_timeout" and err["type"] == "timeout_error"


def test_stream_dropped_by_upstream_ends_with_error_event(proxy: RunningProxy) -> None:
    response = raw_exchange(proxy.port, _stream_request(b"X-Mock-Fault: drop\r\nConnection: close\r\n"))
    assert status_of(response) == 200
    assert b'"code":"upstream_protocol_error"' in response
    assert response.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("workers_grace", [2.0])
def test_graceful_shutdown_lets_stream_finish(
    mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy], workers_grace: float
) -> None:
    import threading

    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}"}})
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(_stream_request(b"X-Mock-Tokens: 20\r\nX-Mock-Itl-Ms: 25\r\n"))
    assert sock.recv(65536)
    stopper = threading.Thread(target=proxy.stop, args=(workers_grace,))
    stopper.start()
    time.sleep(0.05)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).recv(10)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "stream cut during graceful shutdown"
        data += chunk
    assert b"[DONE]" in data
    stopper.join(5)
    sock.close()


def _read_to_close(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_status_line_has_the_reason_phrase_and_one_framing_header(proxy: RunningProxy, mock: MockServer) -> None:
    response = raw_exchange(proxy.port, _request(extra=b"Connection: close\r\n"))
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 ok"
    assert sum(line.startswith(b"content-length:") for line in lines) == 1
    assert not any(line.startswith(b"transfer-encoding:") for line in lines)
    assert b"connection: close" in lines
    assert len(body) == int(next(v for v in lines if v.startswith(b"content-length:")).split(b":")[1])


def test_connection_close_is_honoured_after_the_response(proxy: RunningProxy, mock: MockServer) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        # a second, pipelined request after "Connection: close" is never answered
        sock.sendall(_request(extra=b"Connection: close\r\n") + _request())
        data = _read_to_close(sock)
    assert data.count(b"HTTP/1.1 200") == 1
    assert len(mock.requests) == 1


def test_http10_client_gets_a_close_delimited_stream_then_close(proxy: RunningProxy, mock: MockServer) -> None:
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    request = b"POST /v1/chat/completions HTTP/1.0\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        data = _read_to_close(sock)  # the proxy closes: that is how the body ends
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 200")
    assert b"connection: close" in lines
    assert not any(line.startswith((b"transfer-encoding:", b"content-length:")) for line in lines)
    assert payload.startswith(b"data: {") and payload.rstrip().endswith(b"data: [DONE]")


def test_http10_client_json_reply_has_a_length_and_the_connection_closes(proxy: RunningProxy, mock: MockServer) -> None:
    request = b"POST /v1/chat/completions HTTP/1.0\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        data = _read_to_close(sock)
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower().split(b"\r\n")
    assert json.loads(payload)["object"] == "chat.completion"


def test_streamed_reply_to_http11_is_chunked_and_the_connection_stays_open(
    proxy: RunningProxy, mock: MockServer
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        reader = Reader(sock)
        for _ in range(2):
            sock.sendall(_stream_request())
            status, headers, body = reader.response()
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            assert "connection" not in headers
            assert body.rstrip().endswith(b"data: [DONE]")


def test_body_in_pieces_with_the_next_request_in_the_last_piece(proxy: RunningProxy, mock: MockServer) -> None:
    first, second = _request(), _request(json.dumps({"model": "second", "messages": []}).encode())
    head_end = first.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(first[: head_end + 3])
        time.sleep(0.05)
        sock.sendall(first[head_end + 3 : -4])
        time.sleep(0.05)
        sock.sendall(first[-4:] + second[:20])
        time.sleep(0.05)
        sock.sendall(second[20:])
        reader = Reader(sock)
        assert reader.response()[0] == 200
        assert json.loads(reader.response()[2])["model"] == "second"
    assert [r.model for r in mock.requests] == ["m", "second"]


def test_client_closing_mid_body_never_reaches_the_upstream(proxy: RunningProxy, mock: MockServer) -> None:
    request = _request()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request[:-10])
        sock.shutdown(socket.SHUT_WR)
        data = _read_to_close(sock)
    assert data.startswith(b"HTTP/1.1 400") or data == b""
    time.sleep(0.05)
    assert mock.requests == []


@pytest.mark.parametrize("script", ["extra", "close"])
def test_upstream_connection_not_reused_after_a_bad_or_closing_reply(scripted_proxy: RunningProxy, script: str) -> None:
    _ScriptedUpstream.connections.clear()
    with socket.create_connection(("127.0.0.1", scripted_proxy.port), timeout=5) as sock:
        reader = Reader(sock)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Script: %s\r\n\r\n" % script.encode())
        status, _, body = reader.response()
        assert status == 200 and body == b'{"object":"list","data":[]}'  # exactly its Content-Length
        time.sleep(0.05)
        for _ in range(2):
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
            status, _, body = reader.response()
            assert status == 200 and body == b'{"object":"list","data":[]}'
    assert len(_ScriptedUpstream.connections) == 2  # a new one after the bad reply, then reused


def test_upstream_closing_mid_json_body_is_a_clean_502(scripted_proxy: RunningProxy) -> None:
    """A JSON reply is held to its end (limits.json_hold_bytes): a cut one is an envelope, not half a 200."""
    reply = raw_exchange(scripted_proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Script: cut\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert status_of(reply) == 502
    assert b"content-length: %d" % len(body) in head.lower()
    assert json.loads(body)["error"]["code"] == "upstream_protocol_error"
    after = raw_exchange(scripted_proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert status_of(after) == 200


def test_upstream_closing_mid_body_aborts_the_client_connection(scripted_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", scripted_proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Script: cut-text\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            data = _read_to_close(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-length: 100" in head.lower()
    assert len(body) < 100  # the client can tell the response was cut
    after = raw_exchange(scripted_proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert status_of(after) == 200
