"""``type: bedrock``: AWS Bedrock's Converse and ConverseStream APIs.

``region:`` gives the default ``base_url``
(``https://bedrock-runtime.{region}.amazonaws.com``). Requests are
translated to Converse by the ``bedrock`` codec (:mod:`llmproxy.filters.translate.bedrock`:
Chat Completions through Anthropic Messages, or an Anthropic client's Messages directly);
the provider's model name is the Bedrock model id (or inference profile) in
the path: ``/model/{modelId}/converse`` or ``/converse-stream``.

Credentials, in this order:

* ``keys:`` (or ``AWS_BEARER_TOKEN_BEDROCK`` in the environment): Bedrock
  API keys, sent as ``Authorization: Bearer``; no signing;
* else SigV4, signed with ``botocore.auth.SigV4Auth`` per attempt on the
  final body (the core's :class:`llmproxy.RequestSigner`), with credentials
  from ``aws_access_key_id``/``aws_secret_access_key``/``aws_session_token``
  (``${VAR}`` interpolation as everywhere) or the standard AWS chain
  (``botocore.session.Session().get_credentials()``: environment, ``aws_profile``
  / shared files, container and instance roles). The chain is resolved in a
  thread at startup, and refreshable credentials are refreshed in that thread
  (every ``refresh_seconds``), never on the event loop: the signer only reads
  the last frozen credentials. Until they are resolved an attempt fails with a
  502 ``upstream_auth`` (failover may retry elsewhere). Secrets never appear
  in logs or errors.

Streaming responses are ``application/vnd.amazon.eventstream``: decoded with
``botocore.eventstream.EventStreamBuffer`` into SSE events (the core's
:class:`llmproxy.StreamDecoderFactory`) before anything reads them.

Needs the optional extra: ``pip install 'llmproxy[bedrock]'`` (botocore).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from llmproxy import UpstreamProtocolError
from llmproxy.filters.routing.adapters.base import Adapter, register
from llmproxy.filters.translate.bedrock import BedrockCodec  # noqa: F401  (registers the codec)
from llmproxy.filters.translate.codec import CODECS

__all__ = ["BedrockAdapter", "EventStreamDecoder", "SigV4Signer"]

log = logging.getLogger("llmproxy.routing.bedrock")

EVENT_STREAM_TYPE = b"application/vnd.amazon.eventstream"
_SIGNED = frozenset({b"host", b"content-type", b"accept"})


def _botocore() -> Any:
    try:
        import botocore  # type: ignore[import-untyped]
    except ImportError:
        raise ValueError("type: bedrock needs botocore: pip install 'llmproxy[bedrock]'") from None
    return botocore


class _Credentials:
    """The last frozen AWS credentials, resolved and refreshed in a daemon thread (never on the loop)."""

    def __init__(self, options: Mapping[str, Any], refresh: float) -> None:
        self.frozen: Any = None
        self.error = "AWS credentials are not resolved yet"
        self._options = options
        self._refresh = refresh
        self._stop = threading.Event()
        key, secret = options.get("aws_access_key_id"), options.get("aws_secret_access_key")
        if key and secret:
            from botocore.credentials import ReadOnlyCredentials  # type: ignore[import-untyped]

            self.frozen = ReadOnlyCredentials(key, secret, options.get("aws_session_token") or None)
            return
        threading.Thread(target=self._run, name="llmproxy-aws-credentials", daemon=True).start()

    def _run(self) -> None:
        import botocore.session  # type: ignore[import-untyped]

        creds: Any = None
        while not self._stop.is_set():
            try:
                if creds is None:
                    session = botocore.session.Session(profile=self._options.get("aws_profile") or None)
                    creds = session.get_credentials()
                if creds is None:
                    self.error = "no AWS credentials found (environment, profile, or instance role)"
                else:
                    self.frozen = creds.get_frozen_credentials()  # refreshes when due (blocking: this thread)
            except Exception as exc:  # the chain's failure: logged by kind, never with values
                self.error = f"AWS credentials could not be resolved ({type(exc).__name__})"
                log.warning("bedrock: %s", self.error)
            self._stop.wait(self._refresh if self.frozen is not None else 5.0)

    def close(self) -> None:
        self._stop.set()


class SigV4Signer:
    """:class:`llmproxy.RequestSigner` for Bedrock: ``botocore.auth.SigV4Auth`` over the final request.

    Signs ``host``, ``content-type``, ``accept``, ``x-amz-date`` (and
    ``x-amz-security-token``) and the body's SHA-256; returns the fields
    with ``authorization`` and the ``x-amz-*`` fields added.
    """

    def __init__(self, region: str, credentials: _Credentials, service: str = "bedrock") -> None:
        from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
        from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

        self._auth = SigV4Auth
        self._request = AWSRequest
        self.region = region
        self.service = service
        self.credentials = credentials

    def sign(
        self, method: bytes, url: str, fields: list[tuple[bytes, bytes]], body: bytes
    ) -> list[tuple[bytes, bytes]]:
        frozen = self.credentials.frozen
        if frozen is None:
            raise RuntimeError(self.credentials.error)
        signed = {k.decode("latin-1"): v.decode("latin-1") for k, v in fields if k in _SIGNED}
        request = self._request(method=method.decode("ascii"), url=url, data=body, headers=signed)
        self._auth(frozen, self.service, self.region).add_auth(request)
        out = [kv for kv in fields if kv[0] != b"authorization" and not kv[0].startswith(b"x-amz-")]
        for name, value in request.headers.items():
            lower = name.lower().encode("latin-1")
            if lower == b"authorization" or lower.startswith(b"x-amz-"):
                out.append((lower, value.encode("latin-1")))
        return out


class EventStreamDecoder:
    """:class:`llmproxy.StreamDecoder`: ``application/vnd.amazon.eventstream`` frames -> SSE events.

    An ``event`` frame becomes ``event: <:event-type>`` with its JSON payload
    as ``data:``; an ``exception`` (or ``error``) frame becomes ``event: error``
    with ``{"__type": <:exception-type>, "message"}``. CRCs are checked by botocore.
    """

    __slots__ = ("_buffer", "_pending")

    def __init__(self) -> None:
        from botocore.eventstream import EventStreamBuffer  # type: ignore[import-untyped]

        self._buffer = EventStreamBuffer()
        self._pending = 0

    def feed(self, data: bytes, end: bool) -> bytes:
        from botocore.eventstream import ParserError

        out = b""
        if data:
            self._buffer.add_data(data)
            self._pending += len(data)
            try:
                for message in self._buffer:
                    self._pending -= message.prelude.total_length
                    out += _sse(message.headers, message.payload)
            except ParserError as exc:
                raise UpstreamProtocolError(f"Bedrock event stream is malformed ({type(exc).__name__})") from None
        if end and self._pending:
            raise UpstreamProtocolError("Bedrock event stream ended inside a frame")
        return out


class EventStreamDecoders:
    """:class:`llmproxy.StreamDecoderFactory` for Bedrock streams."""

    content_type = EVENT_STREAM_TYPE

    def __call__(self) -> EventStreamDecoder:
        return EventStreamDecoder()


def _sse(headers: Mapping[str, Any], payload: bytes) -> bytes:
    kind = headers.get(":message-type", "event")
    if kind == "event":
        event = str(headers.get(":event-type", "")).encode("latin-1")
        if b"\n" in payload or b"\r" in payload:
            payload = orjson.dumps(orjson.loads(payload))
        return b"event: " + event + b"\ndata: " + (payload or b"{}") + b"\n\n"
    try:
        parsed = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        parsed = {"message": payload.decode("utf-8", "replace")}
    name = str(headers.get(":exception-type") or headers.get(":error-code") or "InternalServerException")
    message = parsed.get("message") or parsed.get("Message") or headers.get(":error-message", "")
    # the stream's exception types are lowerCamel (throttlingException): the HTTP names are Upper
    name = name[:1].upper() + name[1:]
    return b"event: error\ndata: " + orjson.dumps({"__type": name, "message": message}) + b"\n\n"


@register("bedrock")
class BedrockAdapter(Adapter):
    protocol = "bedrock"
    native_apis = frozenset({"chat"})
    codec = CODECS["bedrock"]
    needs_key = False
    extra_options = {
        "region": None,
        "aws_access_key_id": None,
        "aws_secret_access_key": None,
        "aws_session_token": None,
        "aws_profile": None,
        "refresh_seconds": 300,
    }

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        _botocore()
        region = self.options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not isinstance(region, str) or not region.replace("-", "").isalnum():
            raise ValueError("region: is required (such as us-east-1), or AWS_REGION in the environment")
        self.region = region
        key, secret = self.options.get("aws_access_key_id"), self.options.get("aws_secret_access_key")
        if bool(key) != bool(secret):
            raise ValueError("aws_secret_access_key: aws_access_key_id and aws_secret_access_key go together")
        refresh = self.options.get("refresh_seconds", 300)
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or refresh <= 0:
            raise ValueError("refresh_seconds: must be a positive number")
        self._refresh = float(refresh)
        self._signer: SigV4Signer | None = None

    def default_keys(self) -> list[str]:
        token = os.environ.get("AWS_BEARER_TOKEN_BEDROCK", "").strip()
        return [token] if token else []

    def default_base_url(self) -> str | None:
        return f"https://bedrock-runtime.{self.region}.amazonaws.com"

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"authorization", b"Bearer " + key.encode("latin-1")),)

    def static_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"content-type", b"application/json"),)

    def target_extras(self, key: str) -> dict[str, Any]:
        extras: dict[str, Any] = {"stream_decoder": EventStreamDecoders()}
        if not key:  # no API key: SigV4 (credentials resolved once per provider)
            if self._signer is None:
                self._signer = SigV4Signer(self.region, _Credentials(self.options, self._refresh))
            extras["signer"] = self._signer
        return extras

    def path(self, api: str, provider_model: str, query: str) -> str:
        return self.request_path(api, provider_model, query, stream=False)

    def request_path(self, api: str, provider_model: str, query: str, *, stream: bool) -> str:
        model = quote(provider_model, safe="")
        return f"/model/{model}/converse-stream" if stream else f"/model/{model}/converse"
