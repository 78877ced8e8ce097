"""Failover with key health shared through a real ``redis-server``.

Two proxy *processes* (``python -m proxy serve``, same config file, different
ports) in front of one in-process mock provider share key health: an
ejection seen by one is honoured by the other on its next request, and only
one of them probes. The config gives each provider the header
``x-test-instance: ${LLMPROXY_TEST_INSTANCE}``, set differently in each
process's environment, so the mock can tell whose probe it received.

Then a Redis that goes away mid-run: the proxy keeps serving from its last
known view, says so, and catches up when Redis is back.

Each test starts its own ``redis-server`` (skipped when it is not installed).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.filters.failover import HealthBook, KeyHealth
from llmproxy.mock import KeyBehaviour
from llmproxy.state.redis import RedisStore

from ..redis_server import REDIS_SERVER, SKIP_REASON, free_port, start_redis_server, stop_redis_server
from ..support import LoopThread, wait_healthy
from .test_failover import (
    HI,
    K401,
    KGOOD,
    KGOOD2,
    MODEL,
    ROOT,
    Make,
    StartMock,
    admin,
    call,
    chat,
    config,
    hits,
    is_probe,
    key_id,
    key_state,
    metric,
    probes,
    provider,
    shared_record,
    start_mock_with,
    wait_for,
)

__all__ = ["start_mock_with"]  # re-exported so pytest sees the fixture in this module

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

INTERVAL = 0.2
PROBE_TIMEOUT = 0.5
MODEL_Q = "m-q"
KA = "sk-fo-turns-bad"
KQSTALL = "sk-fo-q-stalls"
KQGOOD = "sk-fo-q-good"
KC = "sk-fo-ejected-elsewhere"


class RedisServer:
    """A private redis-server for one test that can be killed and restarted on its port."""

    def __init__(self) -> None:
        self.proc, self.url = start_redis_server()
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def kill(self) -> None:
        stop_redis_server(self.proc)

    def restart(self) -> None:
        """Start again on the same port, empty (the test servers keep nothing on disk)."""
        self.proc, _ = start_redis_server(self.port)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.kill()


class ProxyProcess:
    """``python -m proxy serve`` in a subprocess, its output in files."""

    def __init__(self, conf: Path, instance: str, workdir: Path) -> None:
        self.instance = instance
        self.port = free_port()
        self.log = workdir / f"{instance}.log"
        env = dict(os.environ, LLMPROXY_TEST_INSTANCE=instance, PYTHONPATH=str(ROOT))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmproxy", "serve", "-c", str(conf), "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )

    def wait_healthy(self) -> None:
        wait_healthy(self.port, self.proc, self.log.read_text, what=f"proxy {self.instance}")

    def probes_sent(self) -> float:
        value = metric(self.port, "llmproxy_failover_probes_sent_total")
        assert value is not None
        return value

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _prober(mock_requests: list[Any]) -> set[str]:
    return {r.headers.get("x-test-instance", "?") for r in mock_requests if is_probe(r)}


def test_two_processes_share_key_health_and_only_one_probes(
    redis_server: RedisServer, start_mock_with: StartMock, tmp_path: Path
) -> None:
    url = redis_server.url
    mock = start_mock_with({K401: KeyBehaviour(status=401), KQSTALL: KeyBehaviour(fault="stall")})
    short = {"connect": 1, "headers": 0.3, "idle": 0.3, "total": 5}
    p = provider(mock.port, [K401, KGOOD, KGOOD2], timeouts=short)
    q = provider(mock.port, [KQSTALL, KQGOOD], name="q", models=[MODEL_Q], timeouts=short)
    for each in (p, q):
        each["headers"] = {"x-test-instance": "${LLMPROXY_TEST_INSTANCE}"}
    health_check = {"interval": INTERVAL, "timeout": PROBE_TIMEOUT, "model": MODEL}
    raw = config(url, [p, q], {"failure_threshold": 1, "eject_for": INTERVAL, "health_check": health_check})
    raw["server"] = {"access_log": "text"}
    conf = tmp_path / "shared.yaml"
    conf.write_text(yaml.safe_dump(raw))
    one, two = ProxyProcess(conf, "one", tmp_path), ProxyProcess(conf, "two", tmp_path)
    try:
        one.wait_healthy()
        two.wait_healthy()

        # Proxy one meets the revoked key (its round-robin starts there) and ejects it.
        first = chat(one.port)
        assert (first.status, first.attempts) == (200, "2")
        assert hits(mock, K401) == 1
        # Proxy two has never seen it fail; its round-robin also starts at that
        # key, so without the shared record one of these would use it.
        for _ in range(3):
            reply = chat(two.port)
            assert (reply.status, reply.attempts) == (200, "1")
        assert hits(mock, K401) == 1
        assert key_state(two.port, K401)["state"] == "ejected"

        # The ejected key is probed, by exactly one of the two.
        wait_for(lambda: len(probes(mock, K401)) >= 2, what="the first probes")
        seen = len(mock.requests)
        time.sleep(10 * INTERVAL)
        window = [r for r in list(mock.requests)[seen:] if is_probe(r)]
        probers = _prober(window)
        assert len(probers) == 1, probers
        assert 4 <= len(window) <= 12, len(window)  # one prober's rate (about 10), not two (about 20)
        assert {r.credential for r in window} == {K401}
        prober, other = (one, two) if probers == {"one"} else (two, one)
        assert prober.probes_sent() >= len(window) and other.probes_sent() == 0
        assert hits(mock, K401) == 1  # still failing its probes: no client traffic

        # Stalling keys at both providers: each probe of one runs to its
        # timeout, longer than the interval, so the other proxy's ticks find
        # them due while the probes are in flight, and one tick of the prober
        # lasts two timeouts. The lease alone, held throughout, keeps the
        # other proxy from probing too.
        mock.config.keys[KGOOD2] = KeyBehaviour(fault="stall")
        served = hits(mock, KGOOD2)
        wait_for(
            lambda: chat(other.port).status == 200 and hits(mock, KGOOD2) > served, what="a request to the stalling key"
        )
        reply = call(other.port, "POST", "/v1/chat/completions", {"model": MODEL_Q, "messages": HI})
        assert (reply.status, reply.attempts) == (200, "2")
        try:
            wait_for(lambda: bool(probes(mock, KGOOD2) and probes(mock, KQSTALL)), what="the stalling keys' probes")
        except AssertionError:
            import sys

            for r in list(mock.requests)[-60:]:
                print(r.credential, r.headers.get("x-test-instance"), is_probe(r), r.model, file=sys.stderr)
            print(key_state(other.port, KGOOD2), key_state(prober.port, KGOOD2), file=sys.stderr)
            raise
        seen = len(mock.requests)
        time.sleep(6 * PROBE_TIMEOUT)
        window = [r for r in list(mock.requests)[seen:] if is_probe(r)]
        assert {r.credential for r in window} == {K401, KGOOD2, KQSTALL}
        # one prober per provider (each provider has its own lease)
        assert _prober([r for r in window if r.credential in (K401, KGOOD2)]) == {prober.instance}
        assert len(_prober([r for r in window if r.credential == KQSTALL])) == 1

        # The prober goes away (releasing its lease): the other one takes over.
        prober.stop()
        seen = len(mock.requests)
        wait_for(lambda: _prober(list(mock.requests)[seen:]) == {other.instance}, what="the other proxy to probe")
        assert other.probes_sent() > 0
        assert chat(other.port).status == 200 and hits(mock, K401) == 1
        assert hits(mock, KGOOD2) == served + 1  # ejected by its one timeout, then only probed
    finally:
        one.stop()
        two.stop()

    for proc in (one, two):
        log = proc.log.read_text()
        assert "/v1/chat/completions" in log  # the access log was on
        for secret in (K401, KGOOD, KGOOD2, KQSTALL, KQGOOD):
            assert secret not in log


def test_redis_outage_serves_from_the_last_view_and_catches_up(
    redis_server: RedisServer,
    start_mock_with: StartMock,
    make_proxy: Make,
    loop_thread: LoopThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llmproxy.failover")
    url = redis_server.url
    mock = start_mock_with({K401: KeyBehaviour(status=401)})
    keys = [K401, KA, KGOOD, KC]
    proxy = make_proxy(config(url, [provider(mock.port, keys)], {"eject_for": 30, "share_interval": 0.2}))

    assert chat(proxy.port).status == 200
    assert key_state(proxy.port, K401)["state"] == "ejected"

    redis_server.kill()
    mock.config.keys[KA] = KeyBehaviour(status=401)  # a key goes bad while the store is away
    before = {k: hits(mock, k) for k in keys}
    replies = [chat(proxy.port) for _ in range(8)]
    assert [r.status for r in replies] == [200] * 8
    assert hits(mock, K401) == before[K401] == 1  # the last known view still avoids it
    assert hits(mock, KA) == before[KA] + 1  # failed once, then ejected in the local view
    row = key_state(proxy.port, KA)
    assert (row["state"], row["reason"]) == ("ejected", "auth")
    assert admin(proxy.port)["store_available"] is False
    assert metric(proxy.port, "llmproxy_failover_store_available") == 0
    errors = metric(proxy.port, "llmproxy_failover_store_errors_total")
    assert errors is not None and errors > 0
    assert "shared store unreachable, serving from the last known key health" in caplog.text

    # Redis is back, empty (no persistence). Another instance ejects KC meanwhile.
    redis_server.restart()
    loop_thread.call(_eject_elsewhere(url, "p", KC))
    time.sleep(0.3)  # past share_interval: the view is read again
    before = {k: hits(mock, k) for k in keys}
    replies = [chat(proxy.port) for _ in range(8)]
    assert [r.status for r in replies] == [200] * 8
    assert admin(proxy.port)["store_available"] is True
    assert metric(proxy.port, "llmproxy_failover_store_available") == 1
    assert "shared store reachable again" in caplog.text
    assert hits(mock, KC) == before[KC]  # the shared record is honoured again
    assert key_state(proxy.port, KC)["state"] == "ejected"
    # The restarted Redis lost the records of the keys ejected before; each
    # costs at most one more failed attempt, and the records are shared again.
    assert hits(mock, K401) - before[K401] <= 1
    assert hits(mock, KA) - before[KA] <= 1
    shared = loop_thread.call(_read_states(url, "p", [K401, KA, KC]))
    assert shared == {K401: "ejected", KA: "ejected", KC: "ejected"}


def _book(store: RedisStore) -> HealthBook:
    return HealthBook(
        store, failure_threshold=3, success_threshold=1, cooldown=30, eject_for=30, trial_after_ejection=True
    )


async def _eject_elsewhere(url: str, provider_name: str, key: str) -> None:
    store = RedisStore(url)
    try:
        await _book(store).failure(HealthBook.record_key(provider_name, key_id(key)), "auth")
    finally:
        await store.close()


async def _read_states(url: str, provider_name: str, keys: list[str]) -> dict[str, str]:
    records = {k: await shared_record(url, HealthBook.record_key(provider_name, key_id(k))) for k in keys}
    return {k: KeyHealth.from_bytes(raw).state for k, raw in records.items()}


def test_frozen_redis_costs_one_timeout_then_requests_run_at_normal_speed(
    redis_server: RedisServer,
    start_mock_with: StartMock,
    make_proxy: Make,
    loop_thread: LoopThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP: Redis accepts connections and never answers; the breaker keeps requests fast."""
    caplog.set_level(logging.INFO, logger="llmproxy")
    url = redis_server.url
    mock = start_mock_with()
    keys = [KGOOD, KGOOD2, KA]
    # socket_timeout 0.5 s (the default); the breaker probes every 0.2 s
    proxy = make_proxy(  # share_interval 0: every request reads the (frozen) store
        config(url + "?probe_interval=0.2", [provider(mock.port, keys)], {"failure_threshold": 1, "share_interval": 0})
    )
    assert chat(proxy.port).status == 200
    assert admin(proxy.port)["store_available"] is True

    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        assert chat(proxy.port).status == 200  # this one notices (and pays one store timeout)
        started = time.monotonic()
        replies = [chat(proxy.port) for _ in range(20)]
        elapsed = time.monotonic() - started
        assert [r.status for r in replies] == [200] * 20
        assert elapsed < 2.0, elapsed  # 20 x 0.5 s store timeouts without the breaker
        assert admin(proxy.port)["store_available"] is False
        down = [r for r in caplog.records if "shared store unreachable" in r.getMessage()]
        assert len(down) == 1  # one warning on the way down, not one per request
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)

    # The probe finds Redis again: key health is shared again.
    wait_for(lambda: chat(proxy.port).status == 200 and admin(proxy.port)["store_available"], what="the store")
    up = [r for r in caplog.records if "shared store reachable again" in r.getMessage()]
    assert len(up) == 1
    mock.config.keys[KA] = KeyBehaviour(status=401)
    served = hits(mock, KA)
    wait_for(lambda: chat(proxy.port).status == 200 and hits(mock, KA) > served, what="a request on the revoked key")
    assert key_state(proxy.port, KA)["state"] == "ejected"
    shared = loop_thread.call(_read_states(url, "p", [KA, KGOOD]))
    assert shared == {KA: "ejected", KGOOD: "healthy"}  # the write reached Redis


def test_shared_health_is_read_once_per_share_interval_not_per_request(
    redis_server: RedisServer, start_mock_with: StartMock, make_proxy: Make, loop_thread: LoopThread
) -> None:
    """Admission reads key health from Redis at most once per ``share_interval``: another
    instance's ejection is honoured after the interval, and requests within it cost no read."""
    url = redis_server.url
    mock = start_mock_with({})
    keys = [KA, KGOOD, KC]
    proxy = make_proxy(config(url, [provider(mock.port, keys)], {"eject_for": 30, "share_interval": 1.5}))
    assert chat(proxy.port).status == 200  # the first request reads the view
    loop_thread.call(_eject_elsewhere(url, "p", KC))
    before = hits(mock, KC)
    assert [chat(proxy.port).status for _ in range(3)] == [200] * 3
    assert hits(mock, KC) == before + 1  # within the interval: the old view, round robin reaches KC
    time.sleep(1.6)
    before = hits(mock, KC)
    assert [chat(proxy.port).status for _ in range(6)] == [200] * 6
    assert hits(mock, KC) == before  # read again: KC is ejected here too
