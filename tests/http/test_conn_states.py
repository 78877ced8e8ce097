"""The client connection's state machine: the transition table, and that real exchanges keep to it."""

from __future__ import annotations

import itertools
import socket
import time

import pytest

from llmproxy.http.request_cycle import TRANSITIONS, IllegalTransition, State, check_transition
from llmproxy.http.server import HttpConnection

from ..support import RunningProxy, raw_exchange, status_of

ALLOWED = {
    (State.HEAD, State.BODY),
    (State.HEAD, State.CLOSED),
    (State.BODY, State.RESPONDING),
    (State.BODY, State.CLOSED),
    (State.RESPONDING, State.HEAD),
    (State.RESPONDING, State.CLOSED),
    (State.CLOSED, State.CLOSED),
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(State, State)))
def test_the_table_allows_exactly_the_cycle_and_closing(old: State, new: State) -> None:
    assert (new in TRANSITIONS[old]) == ((old, new) in ALLOWED)
    if (old, new) in ALLOWED:
        assert check_transition(old, new) is new
    else:
        with pytest.raises(IllegalTransition):
            check_transition(old, new)


CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
STREAM = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
    )


def _chunked(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
CLOSE = b"Connection: close\r\n"

#: (name, bytes sent, expected status of the first response, moves that must be among those made)
SCENARIOS: list[tuple[str, bytes, int, set[tuple[State, State]]]] = [
    (
        "pipelined keep-alive",
        HEALTHZ + _post(CHAT) + b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        200,
        {(State.HEAD, State.BODY), (State.BODY, State.RESPONDING), (State.RESPONDING, State.HEAD)},
    ),
    ("chat, close", _post(CHAT, CLOSE), 200, {(State.RESPONDING, State.CLOSED)}),
    ("stream, close", _post(STREAM, CLOSE), 200, {(State.RESPONDING, State.CLOSED)}),
    ("chunked body", _chunked(CHAT), 200, {(State.BODY, State.RESPONDING)}),
    ("expect 100-continue", _post(CHAT, CLOSE + b"Expect: 100-continue\r\n"), 200, {(State.BODY, State.RESPONDING)}),
    ("HTTP/1.0", _post(CHAT).replace(b"HTTP/1.1", b"HTTP/1.0", 1), 200, {(State.RESPONDING, State.CLOSED)}),
    ("malformed head", b"GET / HTTP/1.1\r\nHost: p\r\nBad Field: x\r\n\r\n", 400, {(State.HEAD, State.CLOSED)}),
    ("body too large", _post(CHAT).replace(b"Content-Length: 57", b"Content-Length: 999999999999"), 413, set()),
    ("bad chunk", _chunked(CHAT).replace(b"\r\n0\r\n", b"\r\nzz\r\n"), 400, {(State.BODY, State.RESPONDING)}),
    ("half-closed mid-body", _post(CHAT)[:-10], 400, {(State.HEAD, State.BODY)}),
    ("HTTP/2 version", b"GET / HTTP/2.0\r\nHost: p\r\n\r\n", 505, {(State.HEAD, State.CLOSED)}),
]


@pytest.mark.parametrize(("name", "data", "status", "moves"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_real_exchanges_make_only_legal_moves(
    proxy: RunningProxy,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    data: bytes,
    status: int,
    moves: set[tuple[State, State]],
) -> None:
    made: list[tuple[State, State]] = []
    illegal: list[tuple[State, State]] = []

    real = HttpConnection._set_state

    def recording(conn: HttpConnection, new: State) -> None:
        old = conn._state
        made.append((old, new))
        if (old, new) not in ALLOWED:
            illegal.append((old, new))
        real(conn, new)

    monkeypatch.setattr(HttpConnection, "_set_state", recording)
    if name == "expect 100-continue":
        head, body = data[: -len(CHAT)], CHAT
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(head)
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                interim += sock.recv(1)
            assert status_of(interim) == 100
            sock.sendall(body)
            response = _read_all(sock)
    elif name == "half-closed mid-body":
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            response = _read_all(sock)
    else:
        response = raw_exchange(proxy.port, data)
    assert status_of(response) == status, response[:200]
    deadline = time.monotonic() + 2.0
    while (not made or made[-1][1] is not State.CLOSED) and time.monotonic() < deadline:
        time.sleep(0.01)  # connection_lost runs on the proxy's loop
    assert not illegal, illegal
    assert made and made[-1][1] is State.CLOSED, made
    assert moves <= set(made), made


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)
