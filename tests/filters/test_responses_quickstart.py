"""The issue's demo: ``llmproxy serve -c conf/quickstart.yaml`` answers the openai SDK's
``responses.create`` (JSON, ``stream=True``, a ``previous_response_id`` follow-up) for
``quickstart-gpt`` (passed through to the mock's own ``/v1/responses``) and
``quickstart-claude`` (bridged to the mock's Anthropic Messages), and ``quickstart-gemini``
(bridged to the mock's Gemini generateContent); the openai and anthropic SDKs reach
``quickstart-gemini`` too, JSON and stream."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from tests.runtime.test_cli_and_plugins import ROOT, _free_port, _wait_healthy


@pytest.fixture(scope="module")
def quickstart() -> Iterator[openai.OpenAI]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "-c", str(ROOT / "conf" / "quickstart.yaml"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        _wait_healthy(port, proc)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-any", max_retries=0, timeout=20)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


@pytest.mark.parametrize("model", ["quickstart-gpt", "quickstart-claude", "quickstart-gemini"])
def test_quickstart_responses_json_stream_and_follow_up(quickstart: openai.OpenAI, model: str) -> None:
    first = quickstart.responses.create(model=model, input="hello")
    assert first.status == "completed" and first.output_text
    events = list(quickstart.responses.create(model=model, input="hello", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 12  # the quickstart mock's 12 tokens
    follow = quickstart.responses.create(model=model, input="and again", previous_response_id=first.id)
    assert follow.status == "completed" and follow.previous_response_id == first.id
    assert first.usage is not None and follow.usage is not None
    assert follow.usage.input_tokens > first.usage.input_tokens  # the earlier turn is in the prompt
    assert quickstart.responses.retrieve(first.id).output_text == first.output_text


def test_quickstart_small_endpoints(quickstart: openai.OpenAI) -> None:
    import anthropic

    assert quickstart.models.retrieve("quickstart-gpt").id == "quickstart-gpt"
    claude = anthropic.Anthropic(
        base_url=str(quickstart.base_url).removesuffix("/v1/"), api_key="sk-any", max_retries=0
    )
    count = claude.messages.count_tokens(model="quickstart-gpt", messages=[{"role": "user", "content": "hello there"}])
    assert count.input_tokens > 0
    assert [m.id for m in claude.models.list().data][:2] == ["quickstart-gpt", "quickstart-claude"]


def test_quickstart_gemini_with_both_sdks(quickstart: openai.OpenAI) -> None:
    import anthropic

    messages = [{"role": "user", "content": "hello"}]
    reply = quickstart.chat.completions.create(model="quickstart-gemini", messages=messages)  # type: ignore[arg-type]
    assert reply.choices[0].message.content and reply.model == "mock-gemini-flash"
    chunks = list(quickstart.chat.completions.create(model="quickstart-gemini", messages=messages, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    claude = anthropic.Anthropic(
        base_url=str(quickstart.base_url).removesuffix("/v1/"), api_key="sk-any", max_retries=0
    )
    message = claude.messages.create(model="quickstart-gemini", max_tokens=64, messages=messages)  # type: ignore[arg-type]
    assert message.content[0].type == "text" and message.content[0].text == reply.choices[0].message.content
    with claude.messages.stream(model="quickstart-gemini", max_tokens=64, messages=messages) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == reply.choices[0].message.content
