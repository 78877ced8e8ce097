"""Every adapter's health probe is a request its provider takes: in its own protocol, on its path."""

from __future__ import annotations

import orjson
import pytest

from llmproxy.filters.routing.adapters import ADAPTERS


def _probe(kind: str, options: dict[str, object], model: str) -> tuple[str, str, dict[bytes, bytes], dict[str, object]]:
    adapter = ADAPTERS[kind](options)
    method, path, headers, body = adapter.probe_request(model)
    return method, path, dict(headers), orjson.loads(body) if body else {}


def test_openai_probe_is_a_one_token_chat_call() -> None:
    method, path, _, body = _probe("openai", {}, "gpt-4o-mini")
    assert (method, path, body["max_tokens"], body["model"]) == ("POST", "/chat/completions", 1, "gpt-4o-mini")


def test_gemini_probe_is_a_one_token_generate_content_call() -> None:
    method, path, headers, body = _probe("gemini", {}, "gemini-2.0-flash")
    assert method == "POST" and path.startswith("/models/gemini-2.0-flash:generateContent")
    assert body["contents"] and body["generationConfig"]["maxOutputTokens"] == 1
    assert "messages" not in body and "model" not in body
    assert headers[b"content-type"] == b"application/json"


def test_bedrock_probe_is_a_one_token_converse_call() -> None:
    pytest.importorskip("botocore")
    method, path, _, body = _probe("bedrock", {"region": "us-east-1"}, "anthropic.claude-3-haiku")
    assert method == "POST" and path == "/model/anthropic.claude-3-haiku/converse"
    assert body["messages"][0]["content"] == [{"text": "ping"}]
    assert body["inferenceConfig"]["maxTokens"] == 1


def test_vertex_claude_probe_is_a_raw_predict_without_model() -> None:
    options = {"project": "p", "region": "us-east5", "publisher": "anthropic", "access_token": "t"}
    method, path, _, body = _probe("vertex", options, "claude-3-5-haiku")
    assert method == "POST" and path.endswith("claude-3-5-haiku:rawPredict")
    assert "model" not in body and body["anthropic_version"] == "vertex-2023-10-16" and body["max_tokens"] == 1


@pytest.mark.parametrize(("kind", "options"), [("openai", {}), ("gemini", {}), ("bedrock", {"region": "us-east-1"})])
def test_a_probe_names_its_content_type_once(kind: str, options: dict[str, object]) -> None:
    """A field sent twice is joined by the receiver: a signature over one value would not match."""
    if kind == "bedrock":
        pytest.importorskip("botocore")
    _, _, headers, _ = ADAPTERS[kind](options).probe_request("m")
    assert [name for name, _ in headers].count(b"content-type") == 1
