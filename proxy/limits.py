"""Server limits with their defaults and the precedent each one follows."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client may make the proxy hold or wait for."""

    #: Request line + header fields (431 past it). nginx: 8 KiB buffers (4 of
    #: them); node.js: 16 KiB; h11: 16 KiB.
    max_header_bytes: int = 16 * 1024
    #: Header fields per request (431 past it). nginx and Apache: 100.
    max_header_count: int = 100
    #: Request body (413 past it). LLM requests carry base64 images; OpenAI
    #: accepts up to 20 MB images, so 32 MiB leaves room for one plus text.
    max_body_bytes: int = 32 * 1024 * 1024
    #: Seconds to receive a whole request head (408 then close; slowloris).
    #: nginx client_header_timeout: 60 s; we are stricter.
    header_timeout: float = 10.0
    #: Seconds without a byte of a started request body (408 then close; a
    #: client that sends a head and then nothing, or dribbles). nginx
    #: client_body_timeout: 60 s (also "between two successive reads"); we are stricter.
    body_timeout: float = 30.0
    #: Seconds an idle keep-alive connection is kept open. nginx: 75 s.
    keepalive_timeout: float = 75.0
    #: Concurrent client connections per worker (503 then close past it).
    max_connections: int = 10_000
    #: Response bytes a filter may hold back (PAUSE) before the exchange fails with 502.
    max_response_buffer_bytes: int = 32 * 1024 * 1024
    #: Bytes of a JSON reply (or an error body) held until its end before its head
    #: goes downstream, so an upstream that fails mid-body still becomes a clean
    #: 502/504 envelope or a retry. Chat and embedding replies are far smaller;
    #: a larger body streams. nginx buffers 4-8 KiB per proxy_buffer, then disk.
    json_hold_bytes: int = 1024 * 1024
    #: Upstream attempts per exchange, retries included.
    max_attempts: int = 5
    #: Bytes queued for a slow client before the proxy stops reading the upstream.
    write_high_water: int = 256 * 1024
    #: Seconds in-flight exchanges get to finish after SIGTERM/SIGINT.
    shutdown_grace: float = 30.0
    #: One server-sent event from an upstream, while the core frames it for
    #: filters (502, or a final SSE error event once streaming, past it). The
    #: largest provider events are whole base64 images (OpenAI image generation
    #: streams partial images, ~1-3 MB each) and long tool-call arguments;
    #: Go SSE clients raise bufio.Scanner's 64 KiB token cap to a few MiB for them.
    max_sse_event_bytes: int = 4 * 1024 * 1024
    #: An upstream response head (status line + fields), whatever the read
    #: boundaries (502 and the connection closed past it). Provider heads are
    #: 1-2 KiB; h11: 16 KiB; Go's net/http client: 10 MiB.
    max_upstream_header_bytes: int = 64 * 1024
    #: Fields of an upstream response head (502 past it). OpenAI behind
    #: Cloudflare sends about 40; HAProxy's default cap is 101.
    max_upstream_header_count: int = 256
