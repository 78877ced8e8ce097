"""OpenAI-compatible presets (``type: groq``, ``type: vllm``...): config and end to end.

Config: each preset's default base URL, its credential header, no key needed
for the local servers, its APIs. End to end through the ``openai`` SDK against
a scripted provider standing in for the preset's base URL: dropped and
refused parameters, a Responses request bridged to Chat Completions, and a
``reasoning_content`` stream counted by metering.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from llmproxy.filters.metering.tokenizer import count_text
from llmproxy.filters.routing.adapters.presets import PRESETS
from llmproxy.filters.routing.table import build_table
from tests import filters_for_tests as tf
from tests.filters.scripted_provider import Reply, Scripted
from tests.filters.test_metering import _exchange_usage
from tests.filters.test_routing_usage import _sse_reply
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "presets.example.yaml"
LOCAL = {"vllm", "ollama", "lmstudio", "sglang"}

ORIGINS = {
    "groq": ("https", "api.groq.com", 443, "/openai/v1"),
    "mistral": ("https", "api.mistral.ai", 443, "/v1"),
    "deepseek": ("https", "api.deepseek.com", 443, "/v1"),
    "together": ("https", "api.together.xyz", 443, "/v1"),
    "fireworks": ("https", "api.fireworks.ai", 443, "/inference/v1"),
    "openrouter": ("https", "openrouter.ai", 443, "/api/v1"),
    "xai": ("https", "api.x.ai", 443, "/v1"),
    "qwen": ("https", "dashscope-intl.aliyuncs.com", 443, "/compatible-mode/v1"),
    "moonshot": ("https", "api.moonshot.ai", 443, "/v1"),
    "perplexity": ("https", "api.perplexity.ai", 443, ""),
    "vllm": ("http", "localhost", 8000, "/v1"),
    "ollama": ("http", "localhost", 11434, "/v1"),
    "lmstudio": ("http", "localhost", 1234, "/v1"),
    "sglang": ("http", "localhost", 30000, "/v1"),
}


def test_every_preset_is_listed() -> None:
    assert set(PRESETS) == set(ORIGINS)


@pytest.mark.parametrize("kind", sorted(ORIGINS))
def test_preset_defaults(kind: str) -> None:
    raw: dict[str, Any] = {"name": "p", "type": kind, "models": ["m"]}
    if kind not in LOCAL:
        raw["key"] = "sk-a"
    provider = build_table({"providers": [raw]}, {}).providers["p"]
    target = provider.targets[0]
    scheme, host, port, prefix = ORIGINS[kind]
    assert (target.scheme, target.host, target.port) == (scheme, host, port)
    assert provider.adapter.type_name == kind
    assert provider.adapter.path("chat", "m", "") == "/chat/completions"
    headers = dict(target.headers)
    if kind in LOCAL:
        assert b"authorization" not in headers  # no key needed, none sent
    else:
        assert headers[b"authorization"] == b"Bearer sk-a"
        with pytest.raises(ValueError, match=r"providers\[0\]\.keys: provider 'p' has no key"):
            build_table({"providers": [{"name": "p", "type": kind, "models": ["m"]}]}, {})
    assert "chat" in provider.adapter.native_apis
    del prefix  # the path prefix is part of the target's base (checked end to end below)


def test_a_base_url_overrides_the_default_and_a_preset_refuses_unknown_keys() -> None:
    raw = {"name": "p", "type": "groq", "base_url": "http://127.0.0.1:9/v1", "key": "k", "models": ["m"]}
    target = build_table({"providers": [raw]}, {}).providers["p"].targets[0]
    assert (target.host, target.port) == ("127.0.0.1", 9)
    with pytest.raises(ValueError, match=r"providers\[0\]\.api_version: unknown key for type groq"):
        build_table({"providers": [{**raw, "api_version": "x"}]}, {})


def test_prepare_body_drops_and_refuses() -> None:
    adapter = (
        build_table({"providers": [{"name": "p", "type": "groq", "key": "k", "models": ["m"]}]}, {})
        .providers["p"]
        .adapter
    )
    body: dict[str, Any] = {"model": "m", "logit_bias": {"1": 2}, "store": True, "service_tier": "auto", "n": 1}
    adapter.prepare_body(body, "chat")
    assert body == {"model": "m", "n": 1}
    with pytest.raises(ValueError, match=r"^n: groq serves one choice"):
        adapter.prepare_body({"n": 2}, "chat")
    with pytest.raises(ValueError, match=r"^logprobs: not supported by groq"):
        adapter.prepare_body({"logprobs": True}, "chat")
    adapter.prepare_body({"logprobs": False}, "chat")  # an explicit "no" is fine


def _config(kind: str, base: str, **metering: Any) -> dict[str, Any]:
    provider: dict[str, Any] = {"name": kind, "type": kind, "base_url": base, "models": {"gpt-x": "up-model"}}
    if kind not in LOCAL:
        provider["keys"] = ["sk-preset-key"]
    return {
        "filters": [
            {"name": "metering", "config": metering},
            {"name": "routing", "config": {"providers": [provider]}},
            {"name": "tests.filters_for_tests:UsageRecorderFactory"},
        ]
    }


CHAT_REPLY = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "up-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def test_groq_drops_hints_and_sends_its_key(scripted: Scripted, make_proxy: Make) -> None:
    scripted.default = Reply(200, json.dumps(CHAT_REPLY).encode())
    proxy = make_proxy(_config("groq", f"{scripted.url}/openai/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    reply = client.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi"}], logit_bias={"1": 1}, store=True
    )
    assert reply.choices[0].message.content == "hi"
    (seen,) = scripted.requests
    assert seen.target == "/openai/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-preset-key"
    assert seen.body["model"] == "up-model"
    assert "logit_bias" not in seen.body and "store" not in seen.body


def test_groq_refuses_n_above_one_before_the_provider(scripted: Scripted, make_proxy: Make) -> None:
    proxy = make_proxy(_config("groq", f"{scripted.url}/openai/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}], n=2)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == "n" and error["code"] == "unsupported_parameter"
    assert "groq" in error["message"]
    assert scripted.requests == []


def test_a_local_preset_sends_no_key(scripted: Scripted, make_proxy: Make) -> None:
    scripted.default = Reply(200, json.dumps(CHAT_REPLY).encode())
    proxy = make_proxy(_config("ollama", f"{scripted.url}/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}], service_tier="auto")
    (seen,) = scripted.requests
    assert "authorization" not in seen.headers
    assert "service_tier" not in seen.body


def test_a_preset_without_responses_is_bridged_to_chat(scripted: Scripted, make_proxy: Make) -> None:
    scripted.default = Reply(200, json.dumps(CHAT_REPLY).encode())
    proxy = make_proxy(_config("deepseek", f"{scripted.url}/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    reply = client.responses.create(model="gpt-x", input="hi")
    assert reply.output_text == "hi"
    (seen,) = scripted.requests
    assert seen.target == "/v1/chat/completions"


def test_a_preset_without_embeddings_refuses_them(scripted: Scripted, make_proxy: Make) -> None:
    proxy = make_proxy(_config("deepseek", f"{scripted.url}/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="gpt-x", input="hi")
    assert info.value.status_code in (400, 404)
    assert scripted.requests == []


@pytest.mark.parametrize("kind", ["deepseek", "qwen"])
def test_a_reasoning_content_stream_is_relayed_and_counted(kind: str, scripted: Scripted, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up-model"}
    thinking, answer = "Let me think about seven times six carefully.", "It is forty-two."
    scripted.default = _sse_reply(
        [
            (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": thinking}}]}),
            (None, {**base, "choices": [{"index": 0, "delta": {"content": answer}}]}),
            (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            (None, "[DONE]"),
        ]
    )
    proxy = make_proxy(_config(kind, f"{scripted.url}/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    chunks = list(
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "7*6?"}], stream=True)
    )
    relayed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert relayed == thinking  # kept in the relayed deltas
    usage = _exchange_usage()
    reasoning = count_text(thinking, "up-model").tokens
    assert usage.reasoning_tokens == reasoning
    assert usage.output_tokens == reasoning + count_text(answer, "up-model").tokens


def test_check_accepts_a_config_with_every_preset(tmp_path: Path) -> None:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    kinds = {p["type"] for p in cfg["filters"][0]["config"]["providers"]}
    assert kinds >= set(PRESETS) | {"openai"}
    env = {k: "sk-x" for k in ("GROQ", "MISTRAL", "DEEPSEEK", "TOGETHER", "FIREWORKS", "OPENROUTER", "XAI")}
    env = {f"{k}_API_KEY": v for k, v in env.items()} | {
        "DASHSCOPE_API_KEY": "sk-x",
        "MOONSHOT_API_KEY": "sk-x",
        "PERPLEXITY_API_KEY": "sk-x",
        "OPENAI_API_KEY": "sk-x",
    }
    done = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **{k: v for k, v in env.items() if k != "GROQ_API_KEY"}},
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "providers[1].key: environment variable GROQ_API_KEY" in done.stderr
