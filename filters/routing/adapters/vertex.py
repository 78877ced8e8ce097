"""``type: vertex``: Google Vertex AI, for Claude (``publisher: anthropic``) or Gemini (``publisher: google``).

Options: ``project:`` and ``region:`` (required; ``global`` for the global
endpoint), ``publisher:`` ``anthropic`` (default) or ``google``. ``base_url``
defaults to ``https://{region}-aiplatform.googleapis.com``
(``https://aiplatform.googleapis.com`` for ``global``). The model name is
the publisher's model id (``claude-sonnet-4@20250514``, ``gemini-2.5-flash``).

* ``publisher: anthropic``: the Anthropic Messages protocol at
  ``/v1/projects/{p}/locations/{r}/publishers/anthropic/models/{m}:rawPredict``
  (``:streamRawPredict`` for a stream); the body goes without ``model`` and with
  ``anthropic_version: vertex-2023-10-16`` (option ``anthropic_version``).
* ``publisher: google``: the ``gemini`` codec at ``.../publishers/google/models/{m}:generateContent``
  (``:streamGenerateContent?alt=sse``).

Credentials: ``access_token:`` (a static OAuth token, for tests and short
runs), else ``keys:`` (static tokens too), else Google credentials through
``google-auth`` (optional extra ``vertex``): ``credentials_file:`` (a
service-account JSON file) or Application Default Credentials. The token is
fetched in a thread at startup and refreshed there before it expires
(``refresh_margin_seconds`` ahead, default 300): the signer that adds
``Authorization: Bearer`` on the loop only reads the current token.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from llmproxy.filters.routing.adapters.base import Adapter, register
from llmproxy.filters.translate.codec import CODECS
from llmproxy.filters.translate.gemini import GeminiCodec  # noqa: F401  (registers the codec)

__all__ = ["GoogleTokenSigner", "VertexAdapter"]

log = logging.getLogger("llmproxy.routing.vertex")

_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class GoogleTokenSigner:
    """:class:`llmproxy.RequestSigner` adding ``Authorization: Bearer`` from google-auth credentials.

    The credentials are loaded and refreshed in a daemon thread (refresh
    does network I/O), ``margin`` seconds before expiry; :meth:`sign` only
    reads the last token (and fails the attempt while there is none).
    """

    def __init__(self, credentials_file: str | None, margin: float) -> None:
        try:
            import google.auth  # noqa: F401
        except ImportError:
            raise ValueError("credentials: google-auth is needed: pip install 'llmproxy[vertex]'") from None
        self.token: bytes | None = None
        self.error = "Google credentials are not resolved yet"
        self._file = credentials_file
        self._margin = margin
        self._stop = threading.Event()
        #: The refresh thread; it ends soon after :meth:`close`.
        self.thread = threading.Thread(target=self._run, name="llmproxy-google-credentials", daemon=True)
        self.thread.start()

    def _load(self) -> Any:
        import google.auth

        if self._file:
            from google.oauth2 import service_account

            return service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                self._file, scopes=[_SCOPE]
            )
        credentials, _ = google.auth.default(scopes=[_SCOPE])
        return credentials

    def _run(self) -> None:
        from google.auth.transport.requests import Request

        credentials: Any = None
        while not self._stop.is_set():
            wait = 5.0
            try:
                if credentials is None:
                    credentials = self._load()
                credentials.refresh(Request())
                self.token = b"Bearer " + str(credentials.token).encode("latin-1")
                expiry = credentials.expiry  # naive UTC datetime, or None
                if expiry is not None:
                    left = expiry.replace(tzinfo=datetime.UTC).timestamp() - time.time()
                    wait = max(5.0, left - self._margin)
                else:
                    wait = 600.0
            except Exception as exc:  # logged by kind, never with a token
                self.error = f"Google credentials could not be refreshed ({type(exc).__name__})"
                log.warning("vertex: %s", self.error)
            self._stop.wait(wait)

    def sign(
        self, method: bytes, url: str, fields: list[tuple[bytes, bytes]], body: bytes
    ) -> list[tuple[bytes, bytes]]:
        token = self.token
        if token is None:
            raise RuntimeError(self.error)
        return [kv for kv in fields if kv[0] != b"authorization"] + [(b"authorization", token)]

    def close(self) -> None:
        """Stop the refresh thread (it ends at its next wait, at once unless a refresh is under way)."""
        self._stop.set()


@register("vertex")
class VertexAdapter(Adapter):
    protocol = "anthropic"
    native_apis = frozenset({"messages"})
    needs_key = False
    extra_options = {
        "project": None,
        "region": None,
        "publisher": "anthropic",
        "anthropic_version": "vertex-2023-10-16",
        "access_token": None,
        "credentials_file": None,
        "refresh_margin_seconds": 300,
        "default_max_tokens": 4096,
    }

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        for name in ("project", "region"):
            value = self.options.get(name)
            if not isinstance(value, str) or not value or "/" in value:
                raise ValueError(f"{name}: is required (a Google Cloud {name} id)")
        self.project, self.region = self.options["project"], self.options["region"]
        publisher = self.options.get("publisher", "anthropic")
        if publisher not in ("anthropic", "google"):
            raise ValueError("publisher: must be anthropic (Claude) or google (Gemini)")
        self.publisher = publisher
        if publisher == "google":
            self.protocol = "gemini"  # type: ignore[misc]
            self.native_apis = frozenset({"chat"})  # type: ignore[misc]
            self.codec = CODECS["gemini"]  # type: ignore[misc]
        version = self.options.get("anthropic_version", "vertex-2023-10-16")
        if not isinstance(version, str) or not version:
            raise ValueError("anthropic_version: must be a non-empty string such as vertex-2023-10-16")
        self.anthropic_version = version
        max_tokens = self.options.get("default_max_tokens", 4096)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("default_max_tokens: must be a positive integer")
        self.default_max_tokens = max_tokens
        margin = self.options.get("refresh_margin_seconds", 300)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError("refresh_margin_seconds: must be a number of seconds")
        self._margin = float(margin)
        self._signer: GoogleTokenSigner | None = None

    def default_base_url(self) -> str | None:
        if self.region == "global":
            return "https://aiplatform.googleapis.com"
        return f"https://{self.region}-aiplatform.googleapis.com"

    def default_keys(self) -> list[str]:
        token = self.options.get("access_token")
        return [token] if isinstance(token, str) and token else []

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"authorization", b"Bearer " + key.encode("latin-1")),)

    def target_extras(self, key: str) -> dict[str, Any]:
        if key:
            return {}
        if self._signer is None:
            self._signer = GoogleTokenSigner(self.options.get("credentials_file"), self._margin)
        return {"signer": self._signer}

    def close(self) -> None:
        if self._signer is not None:
            self._signer.close()

    def path(self, api: str, provider_model: str, query: str) -> str:
        return self.request_path(api, provider_model, query, stream=False)

    def request_path(self, api: str, provider_model: str, query: str, *, stream: bool) -> str:
        model = quote(provider_model, safe="-._@")
        base = f"/v1/projects/{quote(self.project, safe='')}/locations/{quote(self.region, safe='')}"
        if self.publisher == "google":
            verb = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
            return f"{base}/publishers/google/models/{model}{verb}"
        return f"{base}/publishers/anthropic/models/{model}{':streamRawPredict' if stream else ':rawPredict'}"

    def finish_body(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        if self.publisher == "google":
            return body
        out = {k: v for k, v in body.items() if k != "model"}
        out["anthropic_version"] = self.anthropic_version
        return out
