"""Who may reach the admin pages (``server.admin_allow``) and how: over real sockets.

Exact addresses and CIDR networks both grant access; anyone else gets the
404 any unknown path gets. ``HEAD /metrics`` answers like ``GET`` without a
body, as monitoring probes expect.
"""

from __future__ import annotations

from typing import Any

import pytest

from llmproxy.runtime.admin import AdminPages

from ..support import LoopThread, raw_exchange, start_proxy, status_of


def _config(allow: list[str]) -> dict[str, Any]:
    return {"server": {"access_log": "off", "admin_allow": allow}, "upstream": {"url": "http://127.0.0.1:9"}}


@pytest.mark.parametrize(
    ("allow", "expected"),
    [
        (["127.0.0.1"], 200),
        (["127.0.0.0/8"], 200),
        (["0.0.0.0/0"], 200),
        (["10.0.0.0/8", "::1"], 404),
    ],
)
def test_admin_allow_exact_and_cidr(loop_thread: LoopThread, allow: list[str], expected: int) -> None:
    proxy = start_proxy(loop_thread, _config(allow))
    try:
        reply = raw_exchange(proxy.port, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert status_of(reply) == expected, reply[:200]
        if expected == 200:
            assert b"llmproxy_requests" in reply
    finally:
        proxy.stop()


def test_head_metrics_answers_without_body(loop_thread: LoopThread) -> None:
    proxy = start_proxy(loop_thread, _config(["127.0.0.1"]))
    try:
        reply = raw_exchange(proxy.port, b"HEAD /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert status_of(reply) == 200, reply[:200]
        assert b"content-type: text/plain" in head.lower()
        assert body == b""
    finally:
        proxy.stop()


def test_allows_is_exact_for_addresses_and_networks() -> None:
    pages = AdminPages(["192.0.2.7", "10.1.0.0/16", "2001:db8::/32"])
    assert pages.allows("192.0.2.7")
    assert not pages.allows("192.0.2.8")
    assert pages.allows("10.1.255.3")
    assert not pages.allows("10.2.0.1")
    assert pages.allows("2001:db8::5")
    assert pages.allows("::ffff:10.1.0.9")
    assert not pages.allows("not-an-ip")
    assert pages.allows("::ffff:192.0.2.7")  # a dual-stack socket's view of an exact IPv4 entry
    assert not pages.allows("::ffff:192.0.2.8")
