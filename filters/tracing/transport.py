"""The export thread's HTTP transport: one kept-alive ``http.client`` connection to the collector.

The SDK's OTLP/HTTP exporter posts through ``requests`` by default: per
export it merges the session's and the environment's settings, looks for a
``.netrc`` (a ``stat`` per candidate file), prepares the request and goes
through urllib3's pool: about 3.6 M instructions per export, ten times the
same POST on an ``http.client`` connection (0.37 M). At the bench's rates
that was more than half of what tracing cost per exchange.

:class:`ConnectionTransport` is an SDK ``BaseHTTPTransport`` (the exporter's
client keeps its compression, headers, timeout and retry with backoff; only
the socket work changes hands): one persistent connection to the endpoint's
host, reopened after an error or a ``Connection: close``, with the TLS
settings the exporter resolved (``certificate_file`` / ``OTEL_EXPORTER_OTLP_*
CERTIFICATE``, the client certificate and key). :func:`lighten` swaps it in
unless the exporter needs what only ``requests`` does: a credential
provider's session, or an HTTP proxy from the environment for the endpoint.
Used from the export thread only.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport

__all__ = ["ConnectionTransport", "lighten"]

log = logging.getLogger("llmproxy.tracing")

#: The SDK's variables naming a credential provider (a ``requests`` session from an entry point).
_CREDENTIAL_PROVIDERS = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)


@dataclass(frozen=True, slots=True)
class ConnectionResult(BaseHTTPResult):
    """One response (or the error that stood in for it), read in full."""

    body: bytes = b""
    fields: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        return self.fields


class ConnectionTransport(BaseHTTPTransport):
    """One kept-alive connection to one collector (see the module docstring)."""

    def __init__(self, endpoint: str, verify: bool | str = True, cert: str | tuple[str, str] | None = None) -> None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self.endpoint = endpoint
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._context: ssl.SSLContext | None = _tls(verify, cert) if self._https else None
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is None:
            if self._context is not None:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._context)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._conn = conn
        else:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
        return conn

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        if url != self.endpoint:  # the exporter's client posts to the endpoint it was built with
            return ConnectionResult(error=ValueError(f"this transport posts to {self.endpoint}, not {url}"))
        split = urlsplit(url)
        target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        try:
            conn = self._connection(timeout)
            conn.request(method, target, data, headers or {})
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()  # a half-used connection is never reused
            return ConnectionResult(error=error)
        if response.will_close:
            self.close()
        fields = {name.lower(): value for name, value in response.getheaders()}
        return ConnectionResult(status_code=response.status, reason=response.reason, body=body, fields=fields)

    def is_connection_error(self, exception: Exception | None) -> bool:
        """Socket and protocol errors (refused, reset, timed out, a stale kept-alive connection)."""
        return isinstance(exception, (OSError, http.client.HTTPException))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _tls(verify: bool | str, cert: str | tuple[str, str] | None) -> ssl.SSLContext:
    """The client TLS context for ``requests``-style ``verify`` and ``cert`` settings."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif isinstance(verify, str):
        is_dir = os.path.isdir(verify)
        context = ssl.create_default_context(cafile=None if is_dir else verify, capath=verify if is_dir else None)
    else:
        context = ssl.create_default_context()
    if isinstance(cert, tuple):
        context.load_cert_chain(cert[0], cert[1])
    elif cert:
        context.load_cert_chain(cert)
    return context


def lighten(exporter: Any, environ: Mapping[str, str] = os.environ) -> bool:
    """Give an SDK OTLP/HTTP exporter a :class:`ConnectionTransport`; False when it keeps its own.

    It keeps ``requests`` when a credential provider made its session, or
    when the environment routes the endpoint through an HTTP proxy.
    """
    client: Any = getattr(exporter, "_client", None)
    transport: Any = getattr(client, "_transport", None)
    session = getattr(transport, "_session", None)
    endpoint = getattr(client, "_endpoint", None)
    if session is None or not isinstance(endpoint, str):
        return False
    if any(environ.get(name) for name in _CREDENTIAL_PROVIDERS):
        return False
    url = urlsplit(endpoint)
    if url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.hostname or ""):
        return False
    try:
        replacement = ConnectionTransport(endpoint, session.verify, session.cert)
    except (ValueError, OSError, ssl.SSLError) as exc:
        log.warning("tracing: keeping the exporter's own HTTP client (%s)", exc)
        return False
    transport.close()
    client._transport = replacement
    return True
