"""Anthropic's ``/v1/messages/count_tokens`` for a Bedrock or Vertex model: counted here, as for Gemini.

Neither target type maps the provider's own counting endpoint yet (Bedrock
``CountTokens``, Vertex ``count-tokens:rawPredict``), so, as for every
non-Anthropic target, metering answers from its local tokenizer and the
provider sees no request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import pytest

from llmproxy.mock import MockServer
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

PROVIDERS = {
    "bedrock": {
        "type": "bedrock",
        "region": "us-east-1",
        "aws_access_key_id": "AKIDCOUNTTEST0000001",
        "aws_secret_access_key": "count-test-secret",
        "models": {"m": "anthropic.claude-3-5-sonnet-20240620-v1:0"},
    },
    "vertex": {
        "type": "vertex",
        "project": "p",
        "region": "us-east5",
        "access_token": "ya29.count-test",
        "models": {"m": "claude-sonnet-4@20250514"},
    },
}


@pytest.mark.parametrize("kind", sorted(PROVIDERS))
def test_count_tokens_is_answered_by_the_local_tokenizer(mock: MockServer, make_proxy: Make, kind: str) -> None:
    provider = {"name": kind, "base_url": f"http://127.0.0.1:{mock.port}", **PROVIDERS[kind]}
    proxy = make_proxy(
        {"filters": [{"name": "metering", "config": {}}, {"name": "routing", "config": {"providers": [provider]}}]}
    )
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    before = len(mock.requests)
    short = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hello"}])
    long = client.messages.count_tokens(
        model="m", system="Be terse.", messages=[{"role": "user", "content": "hello there, how is the weather?"}]
    )
    assert 0 < short.input_tokens < long.input_tokens
    assert len(mock.requests) == before  # not sent to the provider
    reply = client.messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert reply.content and len(mock.requests) == before + 1  # the model itself is served upstream
