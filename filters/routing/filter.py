"""The ``routing`` filter: pick provider, model and key; rewrite; translate.

Per exchange, on the request side:

1. ``on_request_headers``: classify the API by path; answer ``GET /v1/models``
   locally (only the models the caller's principal may use, when an auth
   filter set one); read (and strip) the ``x-llmproxy-provider`` hint.
2. ``on_request_body``: validate ``model`` (and ``messages``), ask the table
   for candidates in weighted order, and :meth:`RoutingFilter.apply` the
   first: upstream target (with the key's credential), path, model name,
   protocol translation. The decision is published as a
   :class:`~llmproxy.filters.routing.decision.RouteDecision` at
   ``exchange.vars["routing.route"]`` (:mod:`llmproxy.filters.names`), which a
   failover filter re-points before it retries.

On the response side the filter works in one of a few modes, chosen in
``on_response_headers`` from the client's and the provider's protocols:

* watch (same protocol): the body passes unchanged; the provider's usage is
  read from the events that carry one (a byte check first: the other events
  are never parsed) or from the JSON body at its end. OpenAI streams get
  ``stream_options.include_usage``; the usage-only chunk is dropped again
  when the client did not ask for it;
* stream translation: each whole SSE event goes through a translator;
* JSON translation: the body is held (PAUSE) and translated at its end;
  errors likewise become the client's error envelope.

The provider's usage becomes the current attempt's ``attempt.usage`` (a
:class:`llmproxy.Usage`, read in the provider's protocol by
:mod:`llmproxy.filters.routing.usage`), for every protocol pair and mode;
it is also left OpenAI-shaped on ``exchange.vars["routing.usage"]``. The
``metering`` filter completes what the provider did not report. In the
same modes the provider's response id, model and finish reasons go on
``attempt.response_id``, ``response_model`` and ``finish_reasons``
(:mod:`llmproxy.filters.routing.facts`: byte searches, two ``in`` tests per
stream batch), for the ``tracing`` filter.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Awaitable, Mapping
from typing import Any
from urllib.parse import quote, unquote

import orjson

from llmproxy import (
    Action,
    BadRequest,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    MemoryStore,
    ModelNotFound,
    NotFound,
    Principal,
    ServiceUnavailable,
    StoreUnavailable,
    UpstreamProtocolError,
    Usage,
    parse_event,
    split_events,
)
from llmproxy.filters.names import PRINCIPAL, ROUTE, USAGE
from llmproxy.filters.routing.cap import cap_output
from llmproxy.filters.routing.conversations import (
    ConversationSettings,
    ConversationStore,
    Stored,
    output_as_input,
)
from llmproxy.filters.routing.decision import RouteDecision
from llmproxy.filters.routing.facts import may_finish, take_finish, take_head, take_json
from llmproxy.filters.routing.table import NoProvider, Provider, RoutingTable, Target, build_table
from llmproxy.filters.routing.usage import USAGE_OBJECT, StreamUsage, from_provider, openai_shaped, usage_events
from llmproxy.filters.translate import (
    ChainedStream,
    ChatCodec,
    ChatStreamToMessagesStream,
    ChatStreamToResponsesStream,
    CodecRefusal,
    EventTranslator,
    MessagesStreamToChatStream,
    StreamDecoder,
    TranslationError,
    anthropic_envelope_from_openai,
    anthropic_error_to_openai,
    chat_request_to_messages,
    chat_response_to_messages,
    chat_response_to_responses,
    input_items,
    messages_request_to_chat,
    messages_response_to_chat,
    new_response_id,
    openai_error_to_anthropic,
    responses_request_to_chat,
)

__all__ = ["HINT_HEADER", "RoutingFactory", "RoutingFilter"]

log = logging.getLogger("llmproxy.routing")

HINT_HEADER = "x-llmproxy-provider"

#: Path -> (api, protocol the client speaks).
_APIS: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("chat", "openai"),
    "/v1/completions": ("completions", "openai"),
    "/v1/embeddings": ("embeddings", "openai"),
    "/v1/responses": ("responses", "openai"),
    "/v1/messages": ("messages", "anthropic"),
    "/v1/messages/count_tokens": ("count_tokens", "anthropic"),
}


#: The provider-side API when the client's is reached by translation (``responses`` is
#: bridged to Chat Completions, and on to Messages for an Anthropic provider).
_TRANSLATED_API = {"chat": "messages", "messages": "chat", "responses": "chat"}


#: Chat Completions parameters refused on the way on to Messages, by the Responses field they came from.
_RESPONSES_PARAMS = {
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "max_tokens": "max_output_tokens",
}


def _provider_api(api: str, native: frozenset[str]) -> str:
    """The API the provider is asked for when the client called ``api``."""
    if api in native:
        return api
    translated = _TRANSLATED_API[api]
    return translated if translated in native else "messages"


class _Mode(enum.Enum):
    PASS = "pass"  # nothing to do (errors, other APIs)
    WATCH_JSON = "watch_json"  # same protocol, JSON: read the usage at the end, change nothing
    WATCH_STREAM = "watch_stream"  # same protocol, stream: read usage events (and drop an injected usage chunk)
    STREAM = "stream"
    CODEC_STREAM = "codec_stream"  # a codec provider's stream, decoded to chat (and on to the client's API)
    JSON = "json"
    ERROR = "error"


#: The APIs whose replies carry a usage object.
_METERED_APIS = frozenset({"chat", "messages", "completions", "embeddings", "responses"})
#: A watched batch longer than this (a stream that arrived in one piece, or a burst) is searched
#: at its ends only: usage, finish reasons and the injected usage chunk are in the last events
#: before the end (OpenAI's usage chunk, Anthropic's ``message_delta``, Responses'
#: ``response.completed``), and Anthropic's input usage is in the stream's first event.
_WHOLE_BATCH = 2048
#: How many events from a big batch's end are searched.
_TAIL_EVENTS = 4


def _tail_start(data: bytes) -> int:
    """Where the last :data:`_TAIL_EVENTS` events of ``data`` (whole LF-framed events) start."""
    pos = len(data)
    for _ in range(_TAIL_EVENTS + 1):  # one more boundary: the last event's own
        pos = data.rfind(b"\n\n", 0, pos)
        if pos < 0:
            return 0
    return pos + 2


def _bridges(target: Target) -> bool:
    """Whether a Responses request to ``target`` is bridged (its provider has no ``/v1/responses``)."""
    return "responses" not in target.provider.adapter.native_apis


class RoutingFilter(Filter):
    """Per-exchange routing state (also the failover filter's handle on routing)."""

    factory: RoutingFactory
    #: on_response_body handles one or more whole SSE events per call
    sse_batches = True

    __slots__ = (
        "_before",
        "_body",
        "_bridge",
        "_codec",
        "_decoder",
        "_first",
        "_history",
        "_include_usage_asked",
        "_mode",
        "_pieces",
        "_previous",
        "_query",
        "_response_id",
        "_set_aside",
        "_stream",
        "_translator",
        "_usage",
        "api",
        "attempted",
        "candidates",
        "client_protocol",
        "current",
        "hint",
        "key_index",
        "route",
    )

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self.api = ""
        self.client_protocol = "openai"
        self.hint: str | None = None
        #: Targets able to serve the request, in preference order.
        self.candidates: list[Target] = []
        #: The target and key index of the current attempt.
        self.current: Target | None = None
        self.key_index = 0
        #: (provider name, key index) pairs tried so far.
        self.attempted: list[tuple[str, int]] = []
        #: The published decision (None until the request body named a served model).
        self.route: RouteDecision | None = None
        self._body: dict[str, Any] = {}
        #: The client's query string ("" or "?..."), kept because apply() rewrites the path.
        self._query = ""
        #: Client headers of the other protocol, removed by apply() (see there).
        self._set_aside: list[tuple[bytes, bytes]] = []
        self._stream = False
        self._include_usage_asked = False
        self._mode = _Mode.PASS
        self._translator: EventTranslator | None = None
        #: The current provider's chat-pivot codec (None for openai/anthropic), and its stream decoder.
        self._codec: ChatCodec | None = None
        self._decoder: StreamDecoder | None = None
        #: A Responses request bridged to Chat Completions (or on to Messages) by this attempt.
        self._bridge = False
        #: The bridged response's id, and the items of the conversation before it.
        self._response_id = ""
        self._history: list[dict[str, Any]] = []
        #: The usage of the current attempt's stream (provider protocol).
        self._usage: StreamUsage | None = None
        #: The current attempt's JSON body so far (WATCH_JSON).
        self._pieces: list[bytes] = []

    # -- request ------------------------------------------------------------------
    def on_request_headers(self, exchange: Exchange) -> Action | Awaitable[Action]:
        request = exchange.request
        path, _, query = request.path.partition("?")
        self._query = "?" + query if query else ""
        if path == "/v1/models":
            self._models_reply(exchange)
            return Action.CONTINUE
        if path.startswith("/v1/models/") and request.method in ("GET", "HEAD"):
            self._model_reply(exchange, unquote(path[len("/v1/models/") :]))
            return Action.CONTINUE
        if path.startswith("/v1/responses/") and request.method in ("GET", "DELETE"):
            return self._stored_reply(exchange, unquote(path[len("/v1/responses/") :]), request.method)
        api = _APIS.get(path)
        if api is None:
            return Action.CONTINUE
        self.api, self.client_protocol = api
        hint = request.headers.get(HINT_HEADER)
        if hint is not None:
            request.headers.remove(HINT_HEADER)
            hint = hint.strip()
            if hint not in self.factory.table.providers:
                raise BadRequest(
                    f"unknown provider '{hint}' in {HINT_HEADER}", param=HINT_HEADER, code="unknown_provider"
                )
            self.hint = hint
        return Action.CONTINUE

    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        if not self.api:
            return Action.CONTINUE
        payload = exchange.request_json()
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_request")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", param="model", code="missing_model")
        if self.api in ("chat", "messages") and not isinstance(payload.get("messages"), list):
            raise BadRequest("'messages' is required and must be a list", param="messages", code="missing_messages")
        try:
            self.candidates = self.factory.table.candidates(model, self.api, self.hint)
        except NoProvider as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s: routing found no provider for model %r (%s)", exchange.id, model[:200], exc.reason
                )
            if exc.reason == "no_key":
                names = ", ".join(f"'{n}'" for n in exc.providers)
                raise ServiceUnavailable(
                    f"model '{model}' is served only by provider {names}, which has no API key configured",
                    code="provider_key_missing",
                ) from None
            if self.hint is not None:
                raise BadRequest(
                    f"provider '{self.hint}' does not serve model '{model}' for this API",
                    param=HINT_HEADER,
                    code="provider_not_allowed",
                ) from None
            if self.factory.table.owner_of(model) is not None:
                raise BadRequest(
                    f"model '{model}' is served here, but not for the {self.api} API",
                    param="model",
                    code="model_not_supported_for_api",
                ) from None
            raise ModelNotFound(f"The model '{model}' does not exist or is not served here", param="model") from None
        self._body = payload
        self.route = RouteDecision(self.api, self.client_protocol, self.candidates, exchange.filters.index(self), model)
        exchange.vars[ROUTE] = self.route
        self._stream = payload.get("stream") is True
        options = payload.get("stream_options")
        self._include_usage_asked = isinstance(options, dict) and options.get("include_usage") is True
        target = self.candidates[0]
        key_index = target.provider.next_key_index()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s: routing chose %s model %s key %s for %s %r (%d candidate%s)",
                exchange.id,
                target.provider.name,
                target.model,
                target.provider.key_ids[key_index] if target.provider.key_ids else "-",
                self.api,
                model[:200],
                len(self.candidates),
                "" if len(self.candidates) == 1 else "s",
            )
        if self.api == "responses":
            previous = payload.get("previous_response_id")
            if previous is not None and any(_bridges(t) for t in self.candidates):
                return self._continue_conversation(exchange, previous, key_index)
        self.apply(exchange, target, key_index)
        return Action.CONTINUE

    async def _continue_conversation(self, exchange: Exchange, previous: object, key_index: int) -> Action:
        """A follow-up (``previous_response_id``) that some candidate would bridge.

        The conversation lives where it was made: a bridged one in the
        conversation store, a pass-through one at its provider. So before the
        first attempt the candidates are cut to those able to continue it, and
        a failover retry stays among them: when the id is stored here, the
        history is loaded once, for whichever bridged target serves (the
        first or a retry), and the pass-through targets (which do not know
        the id) are left out; when it is not, the bridged targets are left
        out (they have nothing to continue) and the id goes on as it is. With
        a bridged first choice, an id found nowhere (or storage off, or the
        store down) is the client's 400 (503) as before.
        """
        candidates = self.candidates
        first_bridges = _bridges(candidates[0])
        store = self.factory.conversations
        if store is None and first_bridges:
            raise BadRequest(
                "previous_response_id needs stored responses, which are off here (routing responses.store)",
                param="previous_response_id",
                code="response_storage_disabled",
            )
        if not isinstance(previous, str) or not previous:
            raise BadRequest("previous_response_id must be a string", param="previous_response_id")
        stored = None
        if store is not None:
            try:
                stored = await store.load(previous, _owner(exchange))
            except StoreUnavailable:
                if first_bridges:
                    raise ServiceUnavailable("stored responses are unavailable (shared store down)") from None
        if stored is None and first_bridges:
            raise BadRequest(
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if stored is not None:
            self._history = stored.items
        kept = [t for t in candidates if _bridges(t) is (stored is not None)]
        self.candidates = kept
        if self.route is not None:
            self.route.candidates = kept
        target = kept[0]
        self.apply(exchange, target, key_index if target is candidates[0] else target.provider.next_key_index())
        return Action.CONTINUE

    def apply(self, exchange: Exchange, target: Target, key_index: int) -> None:
        """Point the exchange at ``target`` with its ``key_index``-th key.

        Rewrites the upstream, path, provider headers and body (translating
        it when the protocols differ); safe to call again for a retry.
        """
        provider = target.provider
        adapter = provider.adapter
        self.current = target
        self.key_index = key_index
        self.attempted.append((provider.name, key_index))
        route = self.route
        if route is not None:
            route.target, route.key_index = target, key_index
            route.attempted.append((provider.name, key_index))
            route.sent.append((exchange.attempts + 1, target, key_index))
        request = exchange.request
        headers = request.headers
        exchange.upstream = provider.targets[key_index]
        provider_api = _provider_api(self.api, adapter.native_apis)
        self._bridge = self.api == "responses" and provider_api != "responses"
        if self._bridge and not self._response_id:
            self._response_id = new_response_id()
        codec = self._codec = adapter.codec
        request.path = adapter.request_path(provider_api, target.model, self._query, stream=self._stream)
        # Protocol-specific client headers (anthropic-*, openai-*) go only to a
        # provider of that protocol; the others are set aside, not lost, so
        # that a retry on a provider of the other protocol gets them back.
        # A codec provider (another protocol) gets neither kind.
        keep: tuple[bytes, ...]
        drop: tuple[bytes, ...]
        if codec is not None:
            keep, drop = (), (b"openai-", b"anthropic-")
        elif adapter.protocol == "anthropic":
            keep, drop = (b"anthropic-",), (b"openai-",)
        else:
            keep, drop = (b"openai-",), (b"anthropic-",)
        items = headers.raw()
        present = {k for k, _ in items}
        items.extend(kv for kv in self._set_aside if kv[0].startswith(keep) and kv[0] not in present)
        self._set_aside = [kv for kv in self._set_aside if not kv[0].startswith(keep)]
        self._set_aside += [kv for kv in items if kv[0].startswith(drop)]
        items[:] = [kv for kv in items if not kv[0].startswith(drop)]
        for name, value in adapter.static_headers():
            if headers.get_raw(name) is None:
                headers.set_raw(name, value)
        body = self._body
        try:
            if codec is not None and self._messages_native(codec):
                # Claude on Bedrock: Messages straight to the codec (cache_control, thinking kept)
                out = dict(body)
                if route is not None and route.output_cap is not None:
                    cap_output(out, "messages", route.output_cap)
                out = codec.encode_messages_request(out, model=target.model)  # type: ignore[attr-defined]
            elif codec is not None:
                if self._bridge:
                    chat = responses_request_to_chat(body, model=target.model, history=self._history)
                elif self.client_protocol == "anthropic":
                    chat = messages_request_to_chat(body, model=target.model)
                else:
                    chat = body
                if route is not None and route.output_cap is not None:  # capped in chat's field, then encoded
                    chat = dict(chat)
                    cap_output(chat, "chat", route.output_cap)
                out = codec.encode_request(chat, model=target.model)
            elif self._bridge:
                out = responses_request_to_chat(
                    body, model=target.model, history=self._history, keep_thinking=adapter.protocol == "anthropic"
                )
                if adapter.protocol == "anthropic":
                    out = chat_request_to_messages(
                        out, model=target.model, default_max_tokens=getattr(adapter, "default_max_tokens", 4096)
                    )
            elif self.client_protocol == adapter.protocol:
                out = dict(body)
                out["model"] = target.model
                if self._stream and self.api == "chat":
                    out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            elif self.client_protocol == "openai":
                out = chat_request_to_messages(
                    body, model=target.model, default_max_tokens=getattr(adapter, "default_max_tokens", 4096)
                )
            else:
                out = messages_request_to_chat(body, model=target.model)
        except TranslationError as exc:
            param = _RESPONSES_PARAMS.get(exc.param or "", exc.param) if self._bridge else exc.param
            raise BadRequest(
                str(exc).replace(exc.param or "\0", param or ""), param=param, code="invalid_request"
            ) from None
        if route is not None and route.output_cap is not None and codec is None:
            cap_output(out, provider_api, route.output_cap)
        try:
            adapter.prepare_body(out, provider_api)  # provider quirks (presets: dropped / refused parameters)
        except ValueError as exc:
            param = str(exc).partition(":")[0]
            raise BadRequest(f"{exc} (provider {provider.name})", param=param, code="unsupported_parameter") from None
        exchange.set_request_json(adapter.finish_body(out, self._stream))

    # -- response -------------------------------------------------------------------
    def on_response_headers(self, exchange: Exchange) -> Action:
        action = self._choose_mode(exchange)
        if self._mode is _Mode.PASS:
            exchange.skip_response_body(self)  # relayed untouched (and with its Content-Length)
        return action

    def _choose_mode(self, exchange: Exchange) -> Action:
        """Set how this response's body is handled (see _Mode); PAUSE when it is translated whole."""
        self._mode = _Mode.PASS
        self._translator = None
        self._decoder = None
        self._usage = None
        self._pieces = []
        self._previous = self._before = b""
        self._first = False
        target = self.current
        if target is None or exchange.response is None:
            return Action.CONTINUE
        provider_protocol = target.provider.protocol
        translating = provider_protocol != self.client_protocol or self._bridge
        if exchange.upstream_error is not None:
            return Action.CONTINUE  # the core renders its own errors in the client's protocol
        if exchange.response.status >= 400:
            # provider errors speak the provider's protocol
            if provider_protocol != self.client_protocol:
                self._mode = _Mode.ERROR
                exchange.response.headers.set("content-type", "application/json")
                return Action.PAUSE
            return Action.CONTINUE
        codec = self._codec
        if codec is not None:
            return self._choose_codec_mode(exchange, codec, target)
        if exchange.is_sse:
            self._usage = StreamUsage(provider_protocol)
            if translating:
                self._mode = _Mode.STREAM
                if self._bridge:
                    responses = ChatStreamToResponsesStream(
                        request=self._echoed(), response_id=self._response_id, model=target.model
                    )
                    self._translator = (
                        ChainedStream(MessagesStreamToChatStream(model=target.model, include_usage=True), responses)
                        if provider_protocol == "anthropic"
                        else responses
                    )
                elif self.client_protocol == "openai":
                    self._translator = MessagesStreamToChatStream(
                        model=target.model, include_usage=self._include_usage_asked
                    )
                else:
                    self._translator = ChatStreamToMessagesStream(model=target.model)
            elif self.api in _METERED_APIS:
                self._mode = _Mode.WATCH_STREAM
                self._first = True
            return Action.CONTINUE
        if translating:
            self._mode = _Mode.JSON
            return Action.PAUSE
        if self.api in _METERED_APIS:
            self._mode = _Mode.WATCH_JSON
        return Action.CONTINUE

    def _choose_codec_mode(self, exchange: Exchange, codec: ChatCodec, target: Target) -> Action:
        """The mode for a codec provider's success response: always translated (see :mod:`.codec`)."""
        streamed = exchange.is_sse if codec.framing == "sse" else self._stream
        if not streamed:
            self._mode = _Mode.JSON
            return Action.PAUSE
        self._mode = _Mode.CODEC_STREAM
        if self._messages_native(codec):
            self._decoder = self._translator = codec.messages_stream_decoder(model=target.model)  # type: ignore[attr-defined]
            return Action.CONTINUE
        chat_client = self.client_protocol == "openai" and not self._bridge
        decoder = codec.stream_decoder(model=target.model, include_usage=not chat_client or self._include_usage_asked)
        self._decoder = decoder
        if self._bridge:
            responses = ChatStreamToResponsesStream(
                request=self._echoed(), response_id=self._response_id, model=target.model
            )
            self._translator = ChainedStream(decoder, responses)
        elif self.client_protocol == "anthropic":
            self._translator = ChainedStream(decoder, ChatStreamToMessagesStream(model=target.model))
        else:
            self._translator = decoder
        if exchange.response is not None and codec.framing != "sse":
            exchange.response.headers.set("content-type", "text/event-stream")
        return Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        """``data`` is one or more whole SSE events for a stream (``sse_batches``), else a piece of the body."""
        mode = self._mode
        if mode is _Mode.WATCH_STREAM:  # the hot one: every batch of a same-protocol stream
            attempt = exchange.attempt
            if attempt is not None and attempt.response_id is None:
                take_head(attempt, data)  # the id and model are in the first event
            if len(data) > _WHOLE_BATCH and 13 not in data:  # (13: CR line ends take the exact path)
                self._watch_big_batch(exchange, data, end_of_stream)
            elif USAGE_OBJECT.search(data) is not None:  # the byte check: most batches stop here
                self._watch_events(exchange, data)
                self._stream_finish(exchange, data)
            elif end_of_stream:
                self._publish_stream_usage(exchange)
                self._stream_finish(exchange, data)
            else:  # the finish reasons come just before the usage (or the end): kept, not searched
                self._before, self._previous = self._previous, data
            self._first = False
            return Action.CONTINUE
        if mode is _Mode.PASS:
            return Action.CONTINUE
        if mode is _Mode.WATCH_JSON:
            if data:
                self._pieces.append(data)
            if end_of_stream:
                # same protocol: the provider's is the client's
                body = b"".join(self._pieces)
                self._facts(exchange, body)
                self._publish_json_usage(exchange, body, self.client_protocol)
                self._pieces = []
            return Action.CONTINUE
        if mode is _Mode.STREAM:
            return self._translate_events(exchange, data, end_of_stream)
        if mode is _Mode.CODEC_STREAM:
            return self._decode_events(exchange, data, end_of_stream)
        if not end_of_stream:
            return Action.PAUSE
        status = exchange.response.status if exchange.response is not None else 502
        target = self.current
        assert target is not None
        if self._codec is not None:
            return self._codec_body(exchange, self._codec, target, data, status, error=mode is _Mode.ERROR)
        if mode is _Mode.ERROR:
            if self.client_protocol == "openai":
                exchange.set_response_data(anthropic_error_to_openai(data, status))
            else:
                exchange.set_response_data(openai_error_to_anthropic(data, status))
            return Action.CONTINUE
        try:
            parsed = orjson.loads(data)
            if self._bridge:
                chat = (
                    messages_response_to_chat(parsed, model=target.model)
                    if target.provider.protocol == "anthropic"
                    else parsed
                )
                out = chat_response_to_responses(
                    chat, request=self._echoed(), response_id=self._response_id, model=target.model
                )
            elif self.client_protocol == "openai":
                out = messages_response_to_chat(parsed, model=target.model)
            else:
                out = chat_response_to_messages(parsed, model=target.model)
        except (orjson.JSONDecodeError, TranslationError) as exc:
            raise UpstreamProtocolError(f"provider response cannot be translated: {exc}") from None
        try:
            translated = orjson.dumps(out)
        except orjson.JSONEncodeError:
            raise UpstreamProtocolError("provider response is nested too deeply to be translated") from None
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        if isinstance(usage, dict):
            self._publish(exchange, from_provider(target.provider.protocol, usage))
        if exchange.attempt is not None:
            take_json(exchange.attempt, parsed)
        exchange.set_response_data(translated)
        if self._bridge and self._keeps():
            return self._save(exchange, out)
        return Action.CONTINUE

    def _codec_body(
        self, exchange: Exchange, codec: ChatCodec, target: Target, data: bytes, status: int, *, error: bool
    ) -> Action | Awaitable[Action]:
        """A codec provider's whole JSON body (or error body), in the client's protocol."""
        envelope: dict[str, Any] | None = None
        header = getattr(codec, "error_header", None)
        if error and header is not None:  # the codec names its errors in a header (Bedrock)
            error_type = exchange.response.headers.get(header) if exchange.response is not None else None
            status, envelope = codec.decode_error(data, status, error_type=error_type or "")  # type: ignore[call-arg]
        elif error:
            status, envelope = codec.decode_error(data, status)
        else:
            try:
                parsed = orjson.loads(data)
                if not isinstance(parsed, dict):
                    raise TranslationError("response is not a JSON object")
                usage = codec.usage(parsed)
                if usage is not None:
                    self._publish(exchange, usage)
                if self._messages_native(codec):
                    message = codec.decode_messages_response(parsed, model=target.model)  # type: ignore[attr-defined]
                    if exchange.attempt is not None:
                        take_json(exchange.attempt, message)
                    exchange.set_response_data(orjson.dumps(message))
                    return Action.CONTINUE
                chat = codec.decode_response(parsed, model=target.model)
            except CodecRefusal as refusal:
                status, envelope = refusal.status, refusal.envelope
            except (orjson.JSONDecodeError, TranslationError) as exc:
                raise UpstreamProtocolError(f"provider response cannot be translated: {exc}") from None
        if envelope is not None:
            if exchange.response is not None:
                exchange.response.status = status
            if self.client_protocol == "anthropic":
                inner = envelope.get("error")
                envelope = anthropic_envelope_from_openai(inner if isinstance(inner, dict) else None, status=status)
            exchange.set_response_data(orjson.dumps(envelope))
            return Action.CONTINUE
        if self._bridge:
            out = chat_response_to_responses(
                chat, request=self._echoed(), response_id=self._response_id, model=target.model
            )
        elif self.client_protocol == "anthropic":
            out = chat_response_to_messages(chat, model=target.model)
        else:
            out = chat
        if exchange.attempt is not None:
            take_json(exchange.attempt, chat)
            if chat.get("choices"):
                reasons = tuple(c.get("finish_reason") for c in chat["choices"] if isinstance(c, dict))
                exchange.attempt.finish_reasons += tuple(r for r in reasons if isinstance(r, str))
        exchange.set_response_data(orjson.dumps(out))
        if self._bridge and self._keeps():
            return self._save(exchange, out)
        return Action.CONTINUE

    def _messages_native(self, codec: ChatCodec) -> bool:
        """Whether this exchange skips the chat hop: an Anthropic Messages client and a codec that
        takes Messages itself (``messages_native``, see :class:`~llmproxy.filters.translate.BedrockCodec`)."""
        return self.client_protocol == "anthropic" and not self._bridge and getattr(codec, "messages_native", False)

    def _echoed(self) -> dict[str, Any]:
        """The request as the bridged response object echoes it (``store`` false when nothing is kept)."""
        if self.factory.conversations is None and self._body.get("store") is not False:
            return {**self._body, "store": False}
        return self._body

    def _keeps(self) -> bool:
        """Whether this bridged response is to be stored."""
        return self.factory.conversations is not None and self._body.get("store") is not False

    async def _save(self, exchange: Exchange, response: dict[str, Any]) -> Action:
        """Store a bridged response before its last bytes go out (a follow-up sent right after finds it)."""
        store = self.factory.conversations
        assert store is not None
        items = [*self._history, *input_items(self._body), *output_as_input(response.get("output") or [])]
        with contextlib.suppress(StoreUnavailable):  # the answer stands; a follow-up gets "not found"
            await store.save(response, items, _owner(exchange))
        return Action.CONTINUE

    # -- usage and response facts -----------------------------------------------------
    @staticmethod
    def _facts(exchange: Exchange, data: bytes) -> None:
        """The provider's response id, model and finish reasons, onto the attempt (:mod:`.facts`)."""
        attempt = exchange.attempt
        if attempt is not None and data:
            if attempt.response_id is None:
                take_head(attempt, data)
            if may_finish(data):
                take_finish(attempt, data)

    def _stream_finish(self, exchange: Exchange, data: bytes) -> None:
        """The finish reasons of a stream, from the batch that carried its usage (or ended it) and the two
        before: OpenAI's come in the chunk before the usage chunk (or before ``[DONE]``), Anthropic's with
        its usage. Searched once or twice per stream, not per batch (a choice that finished further back
        is not seen)."""
        attempt = exchange.attempt
        if attempt is None or attempt.finish_reasons:
            return
        for piece in (self._before, self._previous, data):
            if piece and may_finish(piece):
                take_finish(attempt, piece)

    def _watch_big_batch(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> None:
        """A long batch of a watched stream: only its first event (on the stream's first batch)
        and its last :data:`_TAIL_EVENTS` events are searched, at C speed, instead of every event.

        A usage object elsewhere in a long batch is a running figure that a later one replaces
        (Anthropic's ``message_start`` is the stream's first event; cumulative usage chunks end
        with the final one), so the ends hold every figure the stream's record needs."""
        start = _tail_start(data)
        if self._first and start:
            head_end = data.find(b"\n\n") + 2
            if 1 < head_end <= start and USAGE_OBJECT.search(data, 0, head_end) is not None:
                self._watch_events(exchange, data, 0, head_end)  # Anthropic's message_start
        tail = data[start:] if start else data
        if USAGE_OBJECT.search(tail) is not None:
            self._watch_events(exchange, data, start)
            self._stream_finish(exchange, tail)
        elif end_of_stream:
            self._publish_stream_usage(exchange)
            self._stream_finish(exchange, tail)
        else:
            self._before, self._previous = self._previous, tail

    def _watch_events(self, exchange: Exchange, data: bytes, start: int = 0, end: int | None = None) -> None:
        """Same-protocol stream: take the usage of the events that carry one; drop the usage-only
        chunk that routing asked for (``include_usage``) when the client did not.

        Only the whole events of ``data[start:end]`` are searched (all of the batch by default)."""
        usage = self._usage
        assert usage is not None
        drop = not self._include_usage_asked and self.api == "chat" and self._stream
        part = data[start:end] if start or end is not None else data
        out = part
        found = usage_events(part)
        for event, payload in found:
            usage.take(payload)
            if drop and payload.get("choices") == []:
                out = out.replace(event, b"", 1)
        if out is not part:
            exchange.set_response_data(out if part is data else data[:start] + out + (data[end:] if end else b""))
        if found:
            self._publish_stream_usage(exchange)

    def _translate_events(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        translator = self._translator
        usage = self._usage
        assert translator is not None and usage is not None
        out: list[bytes] = []
        if data:
            self._facts(exchange, data)
            if USAGE_OBJECT.search(data) is not None:
                for _, payload in usage_events(data):
                    usage.take(payload)
                self._publish_stream_usage(exchange)
            for raw in split_events(data):
                event = parse_event(raw)
                try:
                    out.append(translator.feed(event.event, event.data))
                except TranslationError as exc:
                    raise UpstreamProtocolError(f"provider sent an event that cannot be translated: {exc}") from None
        if end_of_stream:
            out.append(translator.finish())
        exchange.set_response_data(out[0] if len(out) == 1 else b"".join(out))
        if end_of_stream and self._bridge and self._keeps():
            last = translator.last if isinstance(translator, ChainedStream) else translator
            if isinstance(last, ChatStreamToResponsesStream) and last.response is not None and not last.failed:
                return self._save(exchange, last.response)
        return Action.CONTINUE

    def _decode_events(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        """A codec provider's stream (SSE events, or raw bytes for ``framing = "bytes"``) to the client."""
        translator = self._translator
        decoder = self._decoder
        assert translator is not None and decoder is not None
        codec = self._codec
        assert codec is not None
        out: list[bytes] = []
        seen = decoder.usage
        try:
            if data:
                if codec.framing == "sse":
                    for raw in split_events(data):
                        event = parse_event(raw)
                        out.append(translator.feed(event.event, event.data))
                else:
                    out.append(translator.feed(None, data))
            if end_of_stream:
                out.append(translator.finish())
        except TranslationError as exc:
            raise UpstreamProtocolError(f"provider sent an event that cannot be translated: {exc}") from None
        if decoder.usage is not seen and decoder.usage is not None:
            self._publish(exchange, decoder.usage)
        sent = out[0] if len(out) == 1 else b"".join(out)
        if sent:
            self._facts(exchange, sent)
        exchange.set_response_data(sent)
        if end_of_stream and self._bridge and self._keeps():
            last = translator.last if isinstance(translator, ChainedStream) else translator
            if isinstance(last, ChatStreamToResponsesStream) and last.response is not None and not last.failed:
                return self._save(exchange, last.response)
        return Action.CONTINUE

    def _publish_stream_usage(self, exchange: Exchange) -> None:
        if self._usage is not None:
            record = self._usage.result()
            if record is not None:
                self._publish(exchange, record)

    def _publish_json_usage(self, exchange: Exchange, body: bytes, protocol: str) -> None:
        if b'"usage"' not in body:
            return
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        if isinstance(usage, dict):
            self._publish(exchange, from_provider(protocol, usage))

    def _publish(self, exchange: Exchange, record: Usage) -> None:
        """Set the current attempt's provider-reported usage (and the ``routing.usage`` var)."""
        target = self.current
        if target is not None:
            record.model = target.model
            record.provider = target.provider.name
        attempt = exchange.attempt
        if attempt is not None:
            record.key_id = attempt.key_id
            attempt.usage = record
        exchange.vars[USAGE] = openai_shaped(record)

    async def _stored_reply(self, exchange: Exchange, ref: str, method: str) -> Action:
        """``GET``/``DELETE /v1/responses/{id}`` and ``GET .../{id}/input_items``: answered here for
        bridged responses this proxy stored (the caller's own: another principal's is "not found");
        any other id goes to the one provider that serves ``/v1/responses`` itself, when there is
        exactly one (it made the response); else 404, or 400 when storage is off."""
        store = self.factory.conversations
        response_id, _, sub = ref.partition("/")
        if sub not in ("", "input_items") or (sub and method != "GET"):
            raise NotFound(f"no route for {method} /v1/responses/{ref}")
        stored: Stored | None = None
        if store is not None:
            owner = _owner(exchange)
            try:
                if method == "DELETE":
                    if await store.delete(response_id, owner):
                        exchange.send_local_reply(200, {"id": response_id, "object": "response", "deleted": True})
                        return Action.CONTINUE
                else:
                    stored = await store.load(response_id, owner)
            except StoreUnavailable:
                raise ServiceUnavailable("stored responses are unavailable (shared store down)") from None
        if stored is None:
            native = self.factory.table.responses_provider()
            if native is not None:
                self._forward(exchange, native, ref)
                return Action.CONTINUE
            if store is None:
                raise BadRequest(
                    "stored responses are off here (routing responses.store)", code="response_storage_disabled"
                )
            raise NotFound(f"Response with id '{response_id}' not found.", code="not_found")
        if sub:
            produced = len(output_as_input(stored.response.get("output") or []))
            data = stored.items[: len(stored.items) - produced]  # the conversation up to this response
            if "order=asc" not in self._query:
                data = data[::-1]  # OpenAI lists input items newest first unless order=asc
            exchange.send_local_reply(
                200, {"object": "list", "data": data, "first_id": None, "last_id": None, "has_more": False}
            )
        else:
            exchange.send_local_reply(200, stored.response)
        return Action.CONTINUE

    def _forward(self, exchange: Exchange, provider: Provider, ref: str) -> None:
        """Send ``/v1/responses/{ref}`` on to ``provider`` (its key, its path), relayed untouched."""
        key_index = provider.next_key_index()
        self.current = Target(provider, "", provider.weight)
        self.key_index = key_index
        exchange.upstream = provider.targets[key_index]
        request = exchange.request
        request.path = provider.adapter.path("responses", "", "") + "/" + quote(ref, safe="/") + self._query
        for name, value in provider.adapter.static_headers():
            if request.headers.get_raw(name) is None:
                request.headers.set_raw(name, value)

    def _models_reply(self, exchange: Exchange) -> None:
        """Every exact model and alias; only those the caller may use when an auth filter (before
        this one) published a principal with a model allow-list. In Anthropic's shape (``data``,
        ``has_more``, ``first_id``, ``last_id``) when the client sent ``anthropic-version``."""
        principal: Principal | None = exchange.vars.get(PRINCIPAL)
        models = [
            (mid, owner)
            for mid, owner in self.factory.table.model_ids()
            if principal is None or principal.allows_model(mid)
        ]
        if exchange.request.headers.get("anthropic-version") is not None:  # the anthropic SDK's models.list
            anthropic = [
                {"type": "model", "id": mid, "display_name": mid, "created_at": "1970-01-01T00:00:00Z"}
                for mid, _ in models
            ]
            first, last = (models[0][0], models[-1][0]) if models else (None, None)
            body = {"data": anthropic, "has_more": False, "first_id": first, "last_id": last}
            exchange.send_local_reply(200, body)
            return
        data = [{"id": mid, "object": "model", "created": 0, "owned_by": owner} for mid, owner in models]
        exchange.send_local_reply(200, {"object": "list", "data": data})

    def _model_reply(self, exchange: Exchange, model: str) -> None:
        """``GET /v1/models/{id}`` (the SDKs' ``models.retrieve``): the model object, in Anthropic's
        shape when the client sent ``anthropic-version``; 404 ``model_not_found`` when nothing
        here serves it or the caller's principal may not use it (the same answer: a key limited
        to some models learns nothing about the others)."""
        principal: Principal | None = exchange.vars.get(PRINCIPAL)
        owner = self.factory.table.owner_of(model) if model else None
        if owner is None or (principal is not None and not principal.allows_model(model)):
            raise ModelNotFound(f"The model '{model}' does not exist or is not served here", param="model")
        if exchange.request.headers.get("anthropic-version") is not None:
            body: dict[str, Any] = {
                "type": "model",
                "id": model,
                "display_name": model,
                "created_at": "1970-01-01T00:00:00Z",
            }
        else:
            body = {"id": model, "object": "model", "created": 0, "owned_by": owner}
        exchange.send_local_reply(200, body)


def _owner(exchange: Exchange) -> str:
    """Whose stored responses these are: the caller's principal name ("" without auth)."""
    principal: Principal | None = exchange.vars.get(PRINCIPAL)
    return principal.name if principal is not None else ""


class RoutingFactory(FilterFactory):
    """Builds the routing table once from config (see :mod:`llmproxy.filters.routing.table`)."""

    filter_class = RoutingFilter
    fail_open = False

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        table_config = {k: v for k, v in config.items() if k != "responses"}
        self.table: RoutingTable = build_table(table_config, context.mock_ports)
        settings = ConversationSettings.parse(config.get("responses"))
        per_process = context.workers > 1 and isinstance(context.store, MemoryStore)
        #: Bridged Responses kept for previous_response_id (None: storage off, see conversations).
        self.conversations = (
            ConversationStore(context.store, settings) if settings.enabled(per_process=per_process) else None
        )
        context.declare_models(_configured_models(self.table))

    async def close(self) -> None:
        """Stop the adapters' credential refresh threads (Bedrock, Vertex): a reload must not leak them."""
        for provider in self.table.providers.values():
            provider.adapter.close()


def _configured_models(table: RoutingTable) -> set[str]:
    """Every model name the config spells out: client-facing names, aliases, upstream names.

    These may be metric labels; names that only match a pattern are counted as ``other``.
    """
    names: set[str] = set(table.aliases)
    for targets in table.aliases.values():
        names.update(t.model for t in targets)
    for provider in table.providers.values():
        models = provider.models
        for listed in models.listed():
            names.add(listed)
            names.add(models.resolve(listed) or listed)
        names.update(mapped for _, mapped in models.prefixes if mapped)
        if models.wildcard:
            names.add(models.wildcard)
    return names
