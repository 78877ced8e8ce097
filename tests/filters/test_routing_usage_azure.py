"""Usage goldens for the Azure OpenAI provider (``type: azure``), like the OpenAI and Anthropic ones.

Azure speaks the OpenAI protocol with its own extras: ``prompt_filter_results``
and per-choice ``content_filter_results`` in JSON replies; in streams a first
event with no choices (the prompt's filter results, empty id and model), a
``"usage": null`` in every chunk once ``include_usage`` is on, a content
filter event after the finish, then the usage chunk. The proxy reaches the
deployment path with the ``api-key`` header and asks for the usage chunk;
``attempt.usage`` is read for OpenAI and Anthropic clients, JSON and stream,
usage present and absent.
"""

from __future__ import annotations

from typing import Any

import pytest

from llmproxy import Source
from tests.filters.scripted_provider import Reply, Scripted

from .test_routing_usage import (
    OPENAI_EXPECTED,
    OPENAI_USAGE,
    Make,
    _ask,
    _is_stream,
    _json_reply,
    _numbers,
    _only_usage,
    _proxy,
    _sse_reply,
)

_FILTERS = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}
_PROMPT_FILTERS = [{"prompt_index": 0, "content_filter_results": _FILTERS}]
#: Azure's usage object: OpenAI's, with every detail present (zeros included).
AZURE_USAGE = {
    **OPENAI_USAGE,
    "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 4},
    "completion_tokens_details": {
        "accepted_prediction_tokens": 0,
        "audio_tokens": 0,
        "reasoning_tokens": 2,
        "rejected_prediction_tokens": 0,
    },
}

AZURE_JSON: dict[str, Any] = {
    "choices": [
        {
            "content_filter_results": _FILTERS,
            "finish_reason": "stop",
            "index": 0,
            "logprobs": None,
            "message": {"content": "hi there", "refusal": None, "role": "assistant"},
        }
    ],
    "created": 1,
    "id": "chatcmpl-az1",
    "model": "gpt-4o-2024-08-06",
    "object": "chat.completion",
    "prompt_filter_results": _PROMPT_FILTERS,
    "system_fingerprint": "fp_az",
    "usage": AZURE_USAGE,
}


def _azure_chunks(usage: dict[str, Any] | None) -> list[tuple[str | None, dict[str, Any] | str]]:
    base = {
        "id": "chatcmpl-az1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_az",
    }
    nul = {"usage": None} if usage is not None else {}
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        (
            None,
            {
                "choices": [],
                "created": 0,
                "id": "",
                "model": "",
                "object": "",
                "prompt_filter_results": _PROMPT_FILTERS,
            },
        ),
        (
            None,
            {
                **base,
                **nul,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "content_filter_results": {}}],
            },
        ),
        (
            None,
            {
                **base,
                **nul,
                "choices": [{"index": 0, "delta": {"content": "hi there"}, "content_filter_results": _FILTERS}],
            },
        ),
        (
            None,
            {
                **base,
                **nul,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "content_filter_results": {}}],
            },
        ),
        (
            None,
            {
                **base,
                **nul,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": None,
                        "delta": {},
                        "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 8},
                        "content_filter_results": _FILTERS,
                    }
                ],
            },
        ),
    ]
    if usage is not None:
        events.append((None, {**base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return events


def _check_request(scripted: Scripted, stream: bool) -> None:
    seen = scripted.requests[-1]
    assert seen.target.startswith("/openai/deployments/m/chat/completions?api-version="), seen.target
    assert seen.headers.get("api-key") == "sk-test-key-123456" and "authorization" not in seen.headers
    if stream:
        assert seen.body["stream_options"]["include_usage"] is True


@pytest.mark.parametrize("client", ["openai", "anthropic"])
@pytest.mark.parametrize(
    "reply",
    [_json_reply(AZURE_JSON), _sse_reply(_azure_chunks(AZURE_USAGE))],
    ids=["azure-json", "azure-stream"],
)
def test_azure_usage_on_every_client_and_mode(scripted: Scripted, make_proxy: Make, client: str, reply: Reply) -> None:
    scripted.default = reply
    rec = _proxy(make_proxy, scripted.port, "azure")
    stream = _is_stream(reply)
    response = _ask(_proxy.port, client, stream)  # type: ignore[attr-defined]
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert b"hi there" in response
    _check_request(scripted, stream)
    usage = _only_usage(rec)
    assert usage is not None
    assert _numbers(usage) == OPENAI_EXPECTED
    assert usage.input_source is Source.PROVIDER and usage.output_source is Source.PROVIDER
    assert "partial" not in usage.extra
    assert (usage.model, usage.provider) == ("m", "p") and usage.key_id
    assert usage.provider_usage == AZURE_USAGE
    if stream and client == "openai":
        # the usage chunk the proxy asked for is not relayed to a client that did not ask
        assert b'"choices":[],"usage"' not in response


@pytest.mark.parametrize("client", ["openai", "anthropic"])
@pytest.mark.parametrize(
    "reply",
    [_json_reply({k: v for k, v in AZURE_JSON.items() if k != "usage"}), _sse_reply(_azure_chunks(None))],
    ids=["azure-json", "azure-stream"],
)
def test_azure_without_usage_leaves_none(scripted: Scripted, make_proxy: Make, client: str, reply: Reply) -> None:
    scripted.default = reply
    rec = _proxy(make_proxy, scripted.port, "azure")
    response = _ask(_proxy.port, client, _is_stream(reply))  # type: ignore[attr-defined]
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert b"hi there" in response
    assert _only_usage(rec) is None


def test_azure_null_usage_in_every_chunk_is_not_a_usage_object(scripted: Scripted, make_proxy: Make) -> None:
    """``"usage": null`` chunks (sent once include_usage is on) are not parsed as usage: only the last counts."""
    events = _azure_chunks(AZURE_USAGE)
    scripted.default = _sse_reply(events)
    rec = _proxy(make_proxy, scripted.port, "azure")
    response = _ask(_proxy.port, "openai", True, include_usage=True)  # type: ignore[attr-defined]
    assert response.count(b'"usage":null') == 4
    assert response.count(b'"choices":[],"usage":{') == 1
    usage = _only_usage(rec)
    assert usage is not None and _numbers(usage) == OPENAI_EXPECTED
