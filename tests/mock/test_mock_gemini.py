"""The mock provider's Gemini mode, on the wire: paths, JSON and SSE shapes, usage, tool calls,
safety blocks, Gemini's error envelope and the shared fault injection."""

from __future__ import annotations

import httpx
import orjson

from llmproxy.mock import MockServer

BODY = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}


def _url(mock: MockServer, model: str = "gemini-2.5-flash", stream: bool = False) -> str:
    verb = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"http://127.0.0.1:{mock.port}/v1beta/models/{model}:{verb}"


def _events(body: bytes) -> list[dict[str, object]]:
    assert body.endswith(b"\r\n\r\n")
    return [orjson.loads(e.removeprefix(b"data: ")) for e in body.split(b"\r\n\r\n") if e]


def test_generate_content_json(mock: MockServer) -> None:
    r = httpx.post(_url(mock), json=BODY, headers={"x-goog-api-key": "k", "x-mock-tokens": "3"})
    assert r.status_code == 200
    body = r.json()
    assert body["candidates"][0]["content"] == {"parts": [{"text": "lorem ipsum dolor "}], "role": "model"}
    assert body["candidates"][0]["finishReason"] == "STOP"
    assert body["usageMetadata"] == {"promptTokenCount": 2, "candidatesTokenCount": 3, "totalTokenCount": 5}
    assert body["modelVersion"] == "gemini-2.5-flash" and body["responseId"]
    seen = mock.requests[-1]
    assert (seen.model, seen.stream, seen.credential) == ("gemini-2.5-flash", False, "k")


def test_stream_generate_content_sse(mock: MockServer) -> None:
    r = httpx.post(_url(mock, stream=True), json=BODY, headers={"x-mock-tokens": "2"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.content)
    assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in events] == ["lorem ", "ipsum ", ""]  # type: ignore[index]
    assert all("usageMetadata" in e for e in events)
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"  # type: ignore[index]
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 2  # type: ignore[index]
    assert mock.requests[-1].stream


def test_function_calls_max_tokens_and_blocks(mock: MockServer) -> None:
    tools = [{"functionDeclarations": [{"name": "lookup"}]}]
    r = httpx.post(_url(mock), json={**BODY, "tools": tools}, headers={"x-mock-tool-calls": "2"})
    parts = r.json()["candidates"][0]["content"]["parts"]
    assert parts == [
        {"functionCall": {"name": "lookup", "args": {"q": "call 0", "n": 0}}},
        {"functionCall": {"name": "lookup", "args": {"q": "call 1", "n": 1}}},
    ]
    r = httpx.post(_url(mock), json={**BODY, "generationConfig": {"maxOutputTokens": 1}})
    assert r.json()["candidates"][0]["finishReason"] == "MAX_TOKENS"
    blocked = {"contents": [{"role": "user", "parts": [{"text": "[[mock:block-prompt]]"}]}]}
    assert httpx.post(_url(mock), json=blocked).json()["promptFeedback"]["blockReason"] == "SAFETY"
    refused = {"contents": [{"role": "user", "parts": [{"text": "[[mock:block-response]]"}]}]}
    candidate = httpx.post(_url(mock), json=refused).json()["candidates"][0]
    assert candidate["finishReason"] == "SAFETY" and "content" not in candidate


def test_errors_and_faults(mock: MockServer) -> None:
    r = httpx.post(_url(mock), json=BODY, headers={"x-mock-status": "429"})
    assert r.status_code == 429
    assert r.json() == {"error": {"code": 429, "message": r.json()["error"]["message"], "status": "RESOURCE_EXHAUSTED"}}
    r = httpx.post(_url(mock), content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
    r = httpx.post(_url(mock, stream=True), json=BODY, headers={"x-mock-fault": "malformed"})
    assert r.content.startswith(b'data: {"candidates":[{"content":{"parts":[{"text":"lor\r\n\r\n')
