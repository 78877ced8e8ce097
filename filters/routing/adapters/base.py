"""The provider adapter interface: what differs between provider APIs.

An adapter knows, for its kind of provider, which wire protocol it speaks
(``openai`` chat-completions style or ``anthropic`` messages style), how a
credential is sent, and where each API lives under the provider's base URL.
Request and response *translation* between protocols is not the adapter's
job (see :mod:`llmproxy.filters.translate`); the routing filter applies it whenever a
client's protocol differs from the adapter's.

Adding a provider kind is one module: subclass :class:`Adapter`, decorate it
with :func:`register`, import the module in ``adapters/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

__all__ = ["ADAPTERS", "API", "Adapter", "Protocol", "register"]

#: The APIs a client can call, by the path it called.
API = Literal["chat", "completions", "embeddings", "responses", "messages", "count_tokens"]
Protocol = Literal["openai", "anthropic"]

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
    #: The ``base_url`` used when the config gives none (``None``: the config must give one).
    default_base_url: ClassVar[str | None] = None

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        """The headers that carry ``key`` to this provider."""
        raise NotImplementedError

    def static_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Headers every request to this provider carries (API version and the like)."""
        return ()

    def path(self, api: str, provider_model: str, query: str) -> str:
        """The request target below the provider's base URL for ``api``.

        ``query`` is the client's query string (with its ``?``), or ``""``.
        """
        raise NotImplementedError

    def prepare_body(self, body: dict[str, Any], api: str) -> None:
        """Adjust the outgoing request body for this provider, in place (after translation).

        A preset drops the parameters its provider rejects but that do not change
        what the client gets back, and raises ``ValueError("param: reason")`` for one
        the client relies on (the routing filter answers it with a 400 naming the
        parameter). The default leaves the body alone.
        """
