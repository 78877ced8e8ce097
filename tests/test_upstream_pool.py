"""The upstream client on its own, against the mock provider: framing contract and reuse."""

from __future__ import annotations

import pytest

from proxy.errors import UpstreamProtocolError
from proxy.mock_upstream import MockServer
from proxy.upstream import UpstreamPool, UpstreamTarget

from .support import LoopThread

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def _headers(target: UpstreamTarget, length: int | None) -> list[tuple[bytes, bytes]]:
    out = [(b"host", target.host_header), (b"content-type", b"application/json")]
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out


async def _exchange(pool: UpstreamPool, target: UpstreamTarget, length: int | None) -> tuple[int, bytes]:
    response = await pool.send(target, b"POST", b"/v1/chat/completions", _headers(target, length), BODY)
    body = b""
    while chunk := await response.read():
        body += chunk
    response.release()
    return response.status, body


def test_requests_reuse_one_connection_and_read_whole_bodies(loop_thread: LoopThread, mock: MockServer) -> None:
    async def run() -> None:
        pool = UpstreamPool()
        target = UpstreamTarget.from_url("mock", f"http://127.0.0.1:{mock.port}")
        for _ in range(3):
            status, body = await _exchange(pool, target, len(BODY))
            assert status == 200 and body.endswith(b"}")
        (origin,) = pool._pools.values()
        assert len(origin.idle) == 1 and not origin.active
        await pool.close()

    loop_thread.call(run())
    assert len(mock.requests) == 3


@pytest.mark.parametrize("length", [None, len(BODY) - 1, len(BODY) + 1])
def test_a_body_not_framed_by_its_content_length_is_refused_before_sending(
    loop_thread: LoopThread, mock: MockServer, length: int | None
) -> None:
    async def run() -> None:
        pool = UpstreamPool()
        target = UpstreamTarget.from_url("mock", f"http://127.0.0.1:{mock.port}")
        with pytest.raises(UpstreamProtocolError):
            await _exchange(pool, target, length)
        await pool.close()

    loop_thread.call(run())
    assert mock.requests == []
