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
botocore's event-stream pieces (:class:`EventStreamDecoder`) into SSE events
(the core's :class:`llmproxy.StreamDecoderFactory`) before anything reads them.
The refresh thread stops when the routing factory closes (:meth:`BedrockAdapter.close`).

Needs the optional extra: ``pip install 'llmproxy[bedrock]'`` (botocore).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from binascii import crc32
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
        #: The refresh thread (None with static keys); it ends soon after :meth:`close`.
        self.thread: threading.Thread | None = None
        self._options = options
        self._refresh = refresh
        self._stop = threading.Event()
        key, secret = options.get("aws_access_key_id"), options.get("aws_secret_access_key")
        if key and secret:
            from botocore.credentials import ReadOnlyCredentials  # type: ignore[import-untyped]

            self.frozen = ReadOnlyCredentials(key, secret, options.get("aws_session_token") or None)
            return
        self.thread = threading.Thread(target=self._run, name="llmproxy-aws-credentials", daemon=True)
        self.thread.start()

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
        """Stop the refresh thread (it ends at its next wait, at once unless a refresh is under way)."""
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
    with ``{"__type": <:exception-type>, "message"}``.

    Each read is decoded whole, with botocore's own pieces and checks, as
    ``botocore.eventstream.EventStreamBuffer`` does: the prelude by
    ``DecodeUtils.unpack_prelude``, both CRC-32s and the header and payload
    caps (botocore's ``ChecksumMismatch``, ``InvalidHeadersLength``,
    ``InvalidPayloadLength``), the header block by ``EventStreamHeaderParser``.
    What it does not copy from the buffer is its cost: ``EventStreamBuffer``
    re-slices its whole buffer after each message and parses the same three
    headers again for every frame (over half its time). Here a read is walked
    by offset (only an unfinished last frame is kept), and a header block is
    parsed once per distinct bytes: Bedrock sends the same block for every
    frame of a kind, so the SSE head for it is kept in ``heads`` (shared by
    the responses of one target, bounded by :data:`HEAD_CACHE_SIZE`).
    """

    __slots__ = ("_heads", "_rest")

    def __init__(self, heads: dict[bytes, bytes | dict[str, Any]] | None = None) -> None:
        _botocore()
        #: Header block -> the SSE head of an event frame (or the parsed headers of another frame).
        self._heads: dict[bytes, bytes | dict[str, Any]] = {} if heads is None else heads
        #: The start of an unfinished frame (from the previous reads).
        self._rest = b""

    def feed(self, data: bytes, end: bool) -> bytes:
        from botocore.eventstream import ParserError  # type: ignore[import-untyped]

        if self._rest:
            data = self._rest + data
        out: list[bytes] = []
        pos = 0
        try:
            pos = _frames(data, self._heads, out)
        except ParserError as exc:
            raise UpstreamProtocolError(f"Bedrock event stream is malformed ({type(exc).__name__})") from None
        self._rest = data[pos:] if pos < len(data) else b""
        if end and self._rest:
            raise UpstreamProtocolError("Bedrock event stream ended inside a frame")
        return out[0] if len(out) == 1 else b"".join(out)


#: Distinct header blocks kept per target (Bedrock's ConverseStream uses one per event type).
HEAD_CACHE_SIZE = 64
_PRELUDE = 12  # total length, headers length, prelude CRC: 3 x uint32
_UINT32 = struct.Struct("!I")


def _frames(data: bytes, heads: dict[bytes, bytes | dict[str, Any]], out: list[bytes]) -> int:
    """Append the SSE events of the whole frames in ``data`` to ``out``; the offset of the rest."""
    from botocore.eventstream import (
        _MAX_HEADERS_LENGTH,
        _MAX_PAYLOAD_LENGTH,
        ChecksumMismatch,
        DecodeUtils,
        InvalidHeadersLength,
        InvalidPayloadLength,
    )

    prelude = struct.Struct(DecodeUtils.PRELUDE_BYTE_FORMAT).unpack_from
    uint32 = _UINT32.unpack_from
    size = len(data)
    pos = 0
    while size - pos >= _PRELUDE:
        total, headers_length, prelude_crc = prelude(data, pos)
        crc = crc32(data[pos : pos + 8])
        if crc != prelude_crc:
            raise ChecksumMismatch(prelude_crc, crc)
        if headers_length > _MAX_HEADERS_LENGTH:
            raise InvalidHeadersLength(headers_length)
        payload_length = total - headers_length - _PRELUDE - 4
        if payload_length > _MAX_PAYLOAD_LENGTH or payload_length < 0:
            raise InvalidPayloadLength(payload_length)
        if size - pos < total:
            break
        payload_end = pos + total - 4
        crc = crc32(data[pos + 8 : payload_end], prelude_crc)
        (message_crc,) = uint32(data, payload_end)
        if crc != message_crc:
            raise ChecksumMismatch(message_crc, crc)
        headers_end = pos + _PRELUDE + headers_length
        block = data[pos + _PRELUDE : headers_end]
        head = heads.get(block)
        if head is None:
            head = _head(block)
            if len(heads) < HEAD_CACHE_SIZE:
                heads[block] = head
        payload = data[headers_end:payload_end]
        if type(head) is bytes:
            if 10 in payload or 13 in payload:  # LF, CR (an int's memchr: a bytes needle costs 10 times more)
                payload = orjson.dumps(orjson.loads(payload))
            out.append(head + (payload or b"{}") + b"\n\n")
        else:
            out.append(_error_event(head, payload))  # type: ignore[arg-type]
        pos += total
    return pos


def _head(block: bytes) -> bytes | dict[str, Any]:
    """The SSE head (``event: NAME\\ndata: ``) for an event frame's header block, else its headers."""
    from botocore.eventstream import EventStreamHeaderParser, ParserError

    headers: dict[str, Any] = EventStreamHeaderParser().parse(block)
    if headers.get(":message-type", "event") != "event":
        return headers
    event = str(headers.get(":event-type", ""))
    if "\n" in event or "\r" in event:
        raise ParserError("an event type holds a line break")
    return b"event: " + event.encode("utf-8") + b"\ndata: "


def _error_event(headers: Mapping[str, Any], payload: bytes) -> bytes:
    """``event: error`` for an ``exception`` (or ``error``) frame."""
    try:
        parsed = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        parsed = {"message": payload.decode("utf-8", "replace")}
    if not isinstance(parsed, dict):
        parsed = {"message": str(parsed)}
    name = str(headers.get(":exception-type") or headers.get(":error-code") or "InternalServerException")
    message = parsed.get("message") or parsed.get("Message") or headers.get(":error-message", "")
    # the stream's exception types are lowerCamel (throttlingException): the HTTP names are Upper
    name = name[:1].upper() + name[1:]
    return b"event: error\ndata: " + orjson.dumps({"__type": name, "message": message}) + b"\n\n"


class EventStreamDecoders:
    """:class:`llmproxy.StreamDecoderFactory` for Bedrock streams (one per target: the header cache)."""

    content_type = EVENT_STREAM_TYPE

    def __init__(self) -> None:
        self._heads: dict[bytes, bytes | dict[str, Any]] = {}

    def __call__(self) -> EventStreamDecoder:
        return EventStreamDecoder(self._heads)


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
        self._decoders = EventStreamDecoders()

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
        extras: dict[str, Any] = {"stream_decoder": self._decoders}
        if not key:  # no API key: SigV4 (credentials resolved once per provider)
            if self._signer is None:
                self._signer = SigV4Signer(self.region, _Credentials(self.options, self._refresh))
            extras["signer"] = self._signer
        return extras

    def close(self) -> None:
        if self._signer is not None:
            self._signer.credentials.close()

    def path(self, api: str, provider_model: str, query: str) -> str:
        return self.request_path(api, provider_model, query, stream=False)

    def request_path(self, api: str, provider_model: str, query: str, *, stream: bool) -> str:
        model = quote(provider_model, safe="")
        return f"/model/{model}/converse-stream" if stream else f"/model/{model}/converse"
