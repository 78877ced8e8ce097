"""``type: vertex`` end to end: Claude (rawPredict / streamRawPredict) and Gemini on Vertex, against the mock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from llmproxy.mock import MockServer
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

BASE = "/v1/projects/my-proj/locations/us-east5/publishers"


def _config(mock: MockServer, publisher: str, model: str) -> dict[str, Any]:
    provider = {
        "name": "vertex",
        "type": "vertex",
        "project": "my-proj",
        "region": "us-east5",
        "publisher": publisher,
        "base_url": f"http://127.0.0.1:{mock.port}",
        "access_token": "ya29.static-test-token",
        "models": {"m": model},
    }
    return {"filters": [{"name": "routing", "config": {"providers": [provider]}}]}


def test_claude_on_vertex_with_both_sdks(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(mock, "anthropic", "claude-sonnet-4@20250514"))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    message = client.messages.create(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.stop_reason == "end_turn"
    seen = mock.requests[-1]
    assert seen.path == f"{BASE}/anthropic/models/claude-sonnet-4@20250514:rawPredict"
    assert seen.headers["authorization"] == "Bearer ya29.static-test-token"
    assert seen.body is not None and "model" not in seen.body
    assert seen.body["anthropic_version"] == "vertex-2023-10-16"
    with client.messages.stream(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.usage.output_tokens == 16
    assert mock.requests[-1].path.endswith(":streamRawPredict")
    chat = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    reply = chat.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 16
    chunks = list(chat.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(openai.RateLimitError):
        chat.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-status": "429"}
        )


def test_gemini_on_vertex(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(mock, "google", "gemini-2.5-flash"))
    chat = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    reply = chat.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert mock.requests[-1].path == f"{BASE}/google/models/gemini-2.5-flash:generateContent"
    assert mock.requests[-1].headers["authorization"] == "Bearer ya29.static-test-token"
    chunks = list(chat.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert mock.requests[-1].path.endswith(":streamGenerateContent")
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    message = client.messages.create(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text"


def test_vertex_config_is_checked(make_proxy: Make, mock: MockServer) -> None:
    config = _config(mock, "openai", "x")
    with pytest.raises(Exception, match="publisher"):
        make_proxy(config)


def test_service_account_token_from_a_local_token_endpoint(mock: MockServer, make_proxy: Make, tmp_path: Any) -> None:
    """google-auth's service-account flow, offline: a JWT grant posted to a local token_uri, in a thread."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    grants: list[bytes] = []

    class Token(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            grants.append(self.rfile.read(int(self.headers["content-length"])))
            body = json.dumps({"access_token": "ya29.from-sa", "expires_in": 3600, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    account = {
        "type": "service_account",
        "project_id": "my-proj",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "proxy@my-proj.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": f"http://127.0.0.1:{server.server_port}/token",
    }
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(account))
    try:
        config = _config(mock, "anthropic", "claude-sonnet-4@20250514")
        entry = config["filters"][0]["config"]["providers"][0]
        del entry["access_token"]
        entry["credentials_file"] = str(path)
        proxy = make_proxy(config)
        client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
        deadline = time.monotonic() + 10
        while not grants and time.monotonic() < deadline:
            time.sleep(0.02)  # the token is fetched in the signer's thread, off the loop
        time.sleep(0.1)
        client.messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        assert mock.requests[-1].headers["authorization"] == "Bearer ya29.from-sa"
        assert grants and b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in grants[0]
    finally:
        server.shutdown()
