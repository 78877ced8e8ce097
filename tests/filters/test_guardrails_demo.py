"""The issue's demo: ``llmproxy serve -c conf/guardrails-demo.yaml`` redacts emails in responses
(JSON and streams, split over events) and refuses requests with ``forbidden-word`` with 400 in
the client's protocol."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.runtime.test_cli_and_plugins import ROOT, _free_port, _wait_healthy

REPLY = {"x-mock-reply": "write to jane.doe@example.com today", "x-mock-chunk-chars": "3"}
MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    port = _free_port()
    conf = str(ROOT / "conf" / "guardrails-demo.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "-c", conf, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        _wait_healthy(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_the_demo_redacts_emails(demo: str) -> None:
    client = openai.OpenAI(base_url=demo + "/v1", api_key="sk-any", max_retries=0, timeout=20)
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, extra_headers=REPLY)
    assert reply.choices[0].message.content == "write to [redacted:email] today"
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, extra_headers=REPLY, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "write to [redacted:email] today"
    claude = anthropic.Anthropic(base_url=demo, api_key="sk-any", max_retries=0, timeout=20)
    message = claude.messages.create(model="demo", max_tokens=50, messages=MESSAGES, extra_headers=REPLY)
    assert message.content[0].type == "text" and message.content[0].text == "write to [redacted:email] today"


def test_the_demo_blocks_the_forbidden_word(demo: str) -> None:
    client = openai.OpenAI(base_url=demo + "/v1", api_key="sk-any", max_retries=0, timeout=20)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "say forbidden-word"}])
    assert info.value.code == "guardrail_blocked" and "banned-words" in info.value.message
    claude = anthropic.Anthropic(base_url=demo, api_key="sk-any", max_retries=0, timeout=20)
    with pytest.raises(anthropic.BadRequestError) as ainfo:
        claude.messages.create(
            model="demo", max_tokens=5, messages=[{"role": "user", "content": "Forbidden-Word, please"}]
        )
    assert ainfo.value.status_code == 400 and "banned-words" in str(ainfo.value)


def test_the_demo_answers_cors_for_localhost_3000_only(demo: str) -> None:
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(demo)

    def preflight(origin: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=10)
        conn.request(
            "OPTIONS",
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        reply = conn.getresponse()
        reply.read()
        conn.close()
        return reply

    allowed = preflight("http://localhost:3000")
    assert allowed.status == 204 and allowed.getheader("access-control-allow-origin") == "http://localhost:3000"
    other = preflight("http://evil.example")
    assert other.getheader("access-control-allow-origin") is None


def test_the_demo_caches_with_x_llmproxy_cache_on_the_response(demo: str) -> None:
    client = openai.OpenAI(base_url=demo + "/v1", api_key="sk-any", max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "cache me please"}]
    first = client.chat.completions.with_raw_response.create(model="demo", messages=messages, extra_headers=REPLY)
    second = client.chat.completions.with_raw_response.create(model="demo", messages=messages, extra_headers=REPLY)
    assert first.headers["x-llmproxy-cache"] == "miss" and second.headers["x-llmproxy-cache"] == "hit"
    assert second.parse().choices[0].message.content == "write to [redacted:email] today"  # stored redacted
