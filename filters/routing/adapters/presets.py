"""Presets: OpenAI-compatible providers as one declarative table.

Each entry of :data:`PRESETS` becomes ``type: NAME`` (a subclass of
:class:`~llmproxy.filters.routing.adapters.openai.OpenAIAdapter` registered
through :func:`register`, no per-provider code): its default ``base_url``
(so the config may leave it out), whether it takes a key, the APIs it serves
natively (a Responses request to one without ``/responses`` is bridged to its
Chat Completions; an API it lacks entirely is refused with a 400 by the
routing table), and its parameter quirks:

* ``drop``: parameters the provider rejects that only tune how the reply is
  produced (``service_tier``, ``store``, ``parallel_tool_calls``...) are removed
  from the outgoing body;
* ``refuse``: parameters that change what the client gets back (``logprobs``,
  ``n`` above 1...) are answered with a 400 ``unsupported_parameter`` naming the
  parameter, rather than silently returning something else.

Reasoning text in ``reasoning_content`` (DeepSeek, Qwen, Moonshot, xAI, vLLM,
SGLang) or ``reasoning`` (OpenRouter, Ollama, LM Studio) deltas is relayed as
is; metering counts it as reasoning output (see ``filters/metering/relayed.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmproxy.filters.routing.adapters.base import register
from llmproxy.filters.routing.adapters.openai import OpenAIAdapter

__all__ = ["PRESETS", "Preset"]

_CHAT = frozenset({"chat"})
_LOCAL = frozenset({"chat", "completions", "embeddings"})


@dataclass(frozen=True)
class Preset:
    """One OpenAI-compatible provider kind."""

    base_url: str
    apis: frozenset[str]
    needs_key: bool = True
    #: Parameters removed from the body before it is sent.
    drop: frozenset[str] = frozenset()
    #: Parameters answered with a 400 (``n`` only when above 1).
    refuse: frozenset[str] = field(default=frozenset())


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


#: The presets. Base URLs include the ``/v1`` part, as the OpenAI SDK's ``base_url`` does.
PRESETS: Mapping[str, Preset] = {
    "groq": Preset(
        "https://api.groq.com/openai/v1",
        _set("chat", "responses"),
        drop=_set("logit_bias", "service_tier", "store"),
        refuse=_set("logprobs", "top_logprobs", "n"),
    ),
    "mistral": Preset(
        "https://api.mistral.ai/v1",
        _set("chat", "embeddings"),
        drop=_set("logit_bias", "service_tier", "store", "user", "stream_options"),
        refuse=_set("logprobs", "top_logprobs"),
    ),
    "deepseek": Preset(
        "https://api.deepseek.com/v1",
        _CHAT,
        drop=_set("logit_bias", "service_tier", "store", "parallel_tool_calls"),
        refuse=_set("n"),
    ),
    "together": Preset("https://api.together.xyz/v1", _LOCAL, drop=_set("service_tier", "store")),
    "fireworks": Preset(
        "https://api.fireworks.ai/inference/v1", _LOCAL, drop=_set("service_tier", "store", "parallel_tool_calls")
    ),
    "openrouter": Preset("https://openrouter.ai/api/v1", _set("chat", "completions"), drop=_set("store")),
    "xai": Preset("https://api.x.ai/v1", _set("chat", "responses"), drop=_set("service_tier", "store", "logit_bias")),
    "qwen": Preset(
        "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
        _set("chat", "embeddings"),
        drop=_set("logit_bias", "service_tier", "store", "parallel_tool_calls"),
        refuse=_set("n"),
    ),
    "moonshot": Preset(
        "https://api.moonshot.ai/v1", _CHAT, drop=_set("logit_bias", "service_tier", "store", "parallel_tool_calls")
    ),
    "perplexity": Preset(
        "https://api.perplexity.ai",
        _CHAT,
        drop=_set("logit_bias", "service_tier", "store", "parallel_tool_calls", "stream_options"),
        refuse=_set("n", "logprobs", "tools"),
    ),
    "vllm": Preset("http://localhost:8000/v1", _LOCAL, needs_key=False, drop=_set("service_tier", "store")),
    "ollama": Preset(
        "http://localhost:11434/v1", _LOCAL, needs_key=False, drop=_set("service_tier", "store", "logit_bias")
    ),
    "lmstudio": Preset("http://localhost:1234/v1", _LOCAL, needs_key=False, drop=_set("service_tier", "store")),
    "sglang": Preset("http://localhost:30000/v1", _LOCAL, needs_key=False, drop=_set("service_tier", "store")),
}


class PresetAdapter(OpenAIAdapter):
    """An OpenAI-compatible adapter configured by a :class:`Preset` (see the module docstring)."""

    preset: Preset
    extra_options: ClassVar[Mapping[str, Any]] = {}  # type: ignore[assignment]  # no native_responses option

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.native_apis = self.preset.apis  # type: ignore[misc]
        self._drop = tuple(self.preset.drop)
        self._refuse = tuple(self.preset.refuse)

    def default_base_url(self) -> str | None:
        return self.preset.base_url

    def prepare_body(self, body: dict[str, Any], api: str) -> None:
        for name in self._refuse:
            if name in body:
                value = body[name]
                if name == "n":
                    if value not in (None, 1):
                        raise ValueError(f"n: {self.type_name} serves one choice per request (n must be 1)")
                elif value not in (None, False, [], 0):
                    raise ValueError(f"{name}: not supported by {self.type_name}")
        for name in self._drop:
            body.pop(name, None)


def _define(name: str, preset: Preset) -> None:
    cls = type(
        f"{name.capitalize()}Adapter",
        (PresetAdapter,),
        {
            "preset": preset,
            "needs_key": preset.needs_key,
            "__doc__": f"``type: {name}``.",
        },
    )
    register(name)(cls)


for _name, _preset in PRESETS.items():
    _define(_name, _preset)
