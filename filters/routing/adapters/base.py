"""The provider adapter interface: what differs between provider APIs.

An adapter knows, for its kind of provider, which wire protocol it speaks
(``openai`` chat-completions style or ``anthropic`` messages style), how a
credential is sent, and where each API lives under the provider's base URL.
Request and response *translation* between protocols is not the adapter's
job (see :mod:`llmproxy.filters.translate`); the routing filter applies it whenever a
client's protocol differs from the adapter's.

Adding a provider kind is one module: subclass :class:`Adapter`, decorate it
with :func:`register`, import the module in ``adapters/__init__.py``.
A provider with its own wire protocol (not OpenAI's or Anthropic's) also
names a chat-pivot codec in :attr:`Adapter.codec` (see
:mod:`llmproxy.filters.translate.codec`; ``adapters/gemini.py`` is the
example) and, if its streaming endpoint differs, overrides
:meth:`Adapter.request_path`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from llmproxy.filters.translate.codec import ChatCodec

import orjson

from llmproxy.filters.routing.adapters.failures import Failure, FailureKind, HeaderGet, error_code, retry_after

__all__ = ["ADAPTERS", "API", "Adapter", "Failure", "FailureKind", "Protocol", "register"]

#: The APIs a client can call, by the path it called.
API = Literal["chat", "completions", "embeddings", "responses", "messages", "count_tokens"]
#: ``openai`` and ``anthropic`` are translated directly; any other protocol is a codec's name
#: (:mod:`llmproxy.filters.translate.codec`), reached through Chat Completions.
Protocol = str

ADAPTERS: dict[str, type[Adapter]] = {}


def register(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: make an adapter available as ``type: name`` in the config."""

    def add(cls: type[Adapter]) -> type[Adapter]:
        cls.type_name = name
        ADAPTERS[name] = cls
        return cls

    return add


class Adapter:
    """One provider kind. Instances are built once per configured provider.

    ``options`` holds the adapter-specific config keys (those listed in
    ``extra_options``); the constructor validates them and raises
    ``ValueError("field: reason")``.
    """

    type_name: ClassVar[str] = ""
    protocol: ClassVar[Protocol] = "openai"
    #: APIs this provider serves natively (others may be reached by translation).
    native_apis: ClassVar[frozenset[str]] = frozenset()
    #: Config keys this adapter accepts besides the common provider keys, with defaults.
    extra_options: ClassVar[Mapping[str, Any]] = {}
    #: Whether a provider of this type must have a key: one left with none after ``${VAR}``
    #: interpolation is refused at startup unless its config says ``needs_key: false``
    #: (a local OpenAI-compatible server such as vLLM or Ollama).
    needs_key: ClassVar[bool] = True
    #: The chat-pivot codec of a protocol other than ``openai``/``anthropic`` (its ``name`` is
    #: the adapter's ``protocol``); None for those two. Such an adapter serves ``chat`` only:
    #: routing composes messages and responses clients through Chat Completions.
    codec: ClassVar[ChatCodec | None] = None

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    def default_base_url(self) -> str | None:
        """The ``base_url`` when the config gives none (from other options, such as a region)."""
        return None

    def default_keys(self) -> list[str]:
        """The keys when the config gives none (an environment variable the provider's SDKs read)."""
        return []

    def target_extras(self, key: str) -> dict[str, Any]:
        """Extra :class:`llmproxy.UpstreamTarget` fields for the target of ``key`` (``signer``,
        ``stream_decoder``); called once per key at startup."""
        return {}

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        """The headers that carry ``key`` to this provider."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop what the adapter started (a credential refresh thread): called when the routing
        factory closes, at shutdown or after a reload replaced it. Must not block. Idempotent."""

    def static_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Headers every request to this provider carries (API version and the like)."""
        return ()

    def path(self, api: str, provider_model: str, query: str) -> str:
        """The request target below the provider's base URL for ``api``.

        ``query`` is the client's query string (with its ``?``), or ``""``.
        """
        raise NotImplementedError

    def finish_body(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        """The request body as this provider takes it, after routing built (or translated) it:
        the last step before it is sent (Claude on Vertex: no ``model``, its ``anthropic_version``)."""
        return body

    def request_path(self, api: str, provider_model: str, query: str, *, stream: bool) -> str:
        """:meth:`path`, for a provider whose streaming endpoint differs (Gemini's
        ``:streamGenerateContent``); ``stream`` is the client's ``stream: true``."""
        return self.path(api, provider_model, query)

    def prepare_body(self, body: dict[str, Any], api: str) -> None:
        """Adjust the outgoing request body for this provider, in place (after translation).

        A preset drops the parameters its provider rejects but that do not change
        what the client gets back, and raises ``ValueError("param: reason")`` for one
        the client relies on (the routing filter answers it with a 400 naming the
        parameter). The default leaves the body alone.
        """

    def classify(self, status: int, headers: HeaderGet, body_prefix: bytes, now: float) -> Failure:
        """What a reply with ``status`` means for the key that got it (see :class:`FailureKind`).

        ``headers`` is the reply's ``headers.get``; ``body_prefix`` is the first
        bytes of its body (up to 4 KiB; empty when not read); ``now`` is the wall
        clock for date-valued headers. The default knows the OpenAI error shapes:
        429 ``insufficient_quota`` is QUOTA, other 429s RATE_LIMITED (with the
        provider's wait, :func:`retry_after`), 401/403 AUTH, 503/529 OVERLOADED,
        other 5xx SERVER, ``context_length_exceeded`` CONTEXT_LENGTH,
        ``content_filter`` CONTENT_FILTER, other 4xx BAD_REQUEST.
        """
        if status < 400:
            return _OK
        codes = error_code(body_prefix) if body_prefix else frozenset()
        if status == 429:
            if "insufficient_quota" in codes:
                return Failure(FailureKind.QUOTA)
            return Failure(FailureKind.RATE_LIMITED, retry_after(headers, now))
        if status in (401, 403):
            return Failure(FailureKind.AUTH)
        if status >= 500:
            if status in (503, 529) or "overloaded_error" in codes:
                return Failure(FailureKind.OVERLOADED, retry_after(headers, now))
            return Failure(FailureKind.SERVER)
        if "context_length_exceeded" in codes:
            return Failure(FailureKind.CONTEXT_LENGTH)
        if "content_filter" in codes:
            return Failure(FailureKind.CONTENT_FILTER)
        return Failure(FailureKind.BAD_REQUEST)

    def probe_request(self, model: str) -> tuple[str, str, tuple[tuple[bytes, bytes], ...], bytes]:
        """The cheapest request proving a key works: ``(method, path, headers, body)``.

        The credential headers are the target's own; ``headers`` are the extra
        ones (content type, static headers). The default is a one-token
        chat (or messages) call on ``model``, which also proves the model is
        served and the key has quota (a ``GET /models`` does not); an adapter with a
        codec (Gemini, Bedrock) gets it encoded in its own protocol, and every adapter's
        :meth:`finish_body` and :meth:`request_path` apply (Claude on Vertex).
        """
        request: dict[str, Any] = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
        codec = self.codec
        if codec is not None:
            request = codec.encode_request(request, model=model)
            api = "chat"
        else:
            api = "chat" if "chat" in self.native_apis else "messages"
        body = orjson.dumps(self.finish_body(request, False))
        headers = self.static_headers()
        if not any(name == b"content-type" for name, _ in headers):  # once: a signer covers it (Bedrock)
            headers = ((b"content-type", b"application/json"), *headers)
        return "POST", self.request_path(api, model, "", stream=False), headers, body


_OK = Failure(FailureKind.OK)
