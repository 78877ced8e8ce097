"""The core's upstream client, for filters that must call a provider themselves.

Health probes and remote checks go through the worker's own
:class:`~llmproxy.upstream.UpstreamPool` (its connections, timeouts, TLS and
strict response parsing), never through a pool or request heads of their
own: :meth:`UpstreamClient.request` builds the head the way the core does
for proxied requests (one Host, an exact Content-Length, the target's
provider headers last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmproxy.errors import UpstreamError, UpstreamProtocolError
from llmproxy.upstream import UpstreamPool, UpstreamTarget

__all__ = ["UpstreamClient", "UpstreamReply", "signed_fields"]

#: Largest reply body :meth:`UpstreamClient.request` reads (probes and checks answer small bodies).
MAX_REPLY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A whole reply: status, fields (lowercase names) and body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class UpstreamClient:
    """Sends whole requests to upstream targets through the worker's pool."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    async def request(
        self,
        target: UpstreamTarget,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        max_body: int = MAX_REPLY_BYTES,
    ) -> UpstreamReply:
        """Send one request below ``target``'s base path and read the whole reply.

        Raises :class:`~llmproxy.errors.UpstreamError` subclasses (connect,
        protocol, timeout), and :class:`UpstreamProtocolError` for a body
        over ``max_body`` bytes. ``headers`` must be validated fields without
        Host, Content-Length or the target's own headers (added here).
        """
        fields = [(b"host", target.host_header), *headers]
        if body or method not in ("GET", "HEAD"):
            fields.append((b"content-length", b"%d" % len(body)))
        fields.extend(target.headers)
        wire_path = (target.base_path + path).encode("latin-1")
        raw_method = method.encode("ascii")
        if target.signer is not None:  # a signed provider (Bedrock): signed like an attempt
            fields = signed_fields(target, raw_method, wire_path, fields, body)
        response = await self.pool.send(target, raw_method, wire_path, fields, body)
        try:
            chunks: list[bytes] = []
            size = 0
            while chunk := await response.read():
                size += len(chunk)
                if size > max_body:
                    raise UpstreamProtocolError(f"reply from upstream '{target.name}' larger than {max_body} bytes")
                chunks.append(chunk)
            response.release()
        finally:
            response.close()  # no-op after release
        return UpstreamReply(response.status, response.headers, b"".join(chunks))


def signed_fields(
    target: UpstreamTarget, method: bytes, path: bytes, fields: list[tuple[bytes, bytes]], body: bytes
) -> list[tuple[bytes, bytes]]:
    """The request's fields as ``target.signer`` signs them, for ``path`` (the base path included).

    The signer's own failure (no credentials, expired) is an :class:`UpstreamError`
    ``upstream_auth``: a 502 for an attempt, a failed call for :meth:`UpstreamClient.request`.
    """
    assert target.signer is not None
    url = f"{target.scheme}://{target.host_header.decode('latin-1')}{path.decode('latin-1')}"
    try:
        return target.signer.sign(method, url, fields, body)
    except Exception as exc:
        message = f"the request to '{target.name}' could not be signed: {exc}"
        raise UpstreamError(message, code="upstream_auth") from None
