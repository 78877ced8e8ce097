"""Per-target request signing and upstream body decoding (core facilities for provider adapters).

Two small protocols an :class:`~llmproxy.UpstreamTarget` may carry:

* :class:`RequestSigner` (``UpstreamTarget.signer``): called by the attempt
  loop with the *final* method, URL, header fields and body of each
  attempt's upstream request, right before it is written (after every
  filter ran, after ``Content-Length`` was set). A retry or failover attempt
  is signed again. It returns the fields to send (typically the input plus
  ``authorization``, ``x-amz-date`` and the like). Contract: it runs on the
  event loop, so it must not block (no network, no file I/O: credentials are
  resolved and refreshed elsewhere, off the loop); it must not change the
  body (it cannot: the body is already final); an exception it raises fails
  the attempt as a 502 ``upstream_auth`` error (its message must never hold
  a secret).

* :class:`StreamDecoder` (``UpstreamTarget.stream_decoder``): a factory of a
  per-response decoder for a provider whose streaming responses are not
  SSE (AWS ``application/vnd.amazon.eventstream``). When a response's
  ``content-type`` starts with the decoder's ``content_type``, the relay
  passes each upstream read through ``feed`` before anything else sees it,
  and the response is treated as ``text/event-stream`` from then on (its
  ``content-type`` header is rewritten): the decoder's output must be whole
  SSE events (``event: NAME\\ndata: JSON\\n\\n``). So everything the core and
  the filters do for streams (first-token time, stream metrics, SSE
  batches, held events, caps, client-disconnect cancellation) applies to the
  decoded events. ``feed(data, end)`` returns the SSE bytes for the frames
  completed so far (``b""`` while a frame is incomplete); with ``end`` True
  it raises :class:`~llmproxy.UpstreamProtocolError` when the body stopped
  inside a frame.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["RequestSigner", "StreamDecoder", "StreamDecoderFactory"]


class RequestSigner(Protocol):
    """Signs one upstream request (see the module docstring for the contract)."""

    def sign(
        self, method: bytes, url: str, fields: list[tuple[bytes, bytes]], body: bytes
    ) -> list[tuple[bytes, bytes]]: ...


class StreamDecoder(Protocol):
    """Turns one response's raw body into whole SSE events (see the module docstring)."""

    def feed(self, data: bytes, end: bool) -> bytes: ...


class StreamDecoderFactory(Protocol):
    """Makes a :class:`StreamDecoder` per response whose content type starts with ``content_type``."""

    content_type: bytes

    def __call__(self) -> StreamDecoder: ...
