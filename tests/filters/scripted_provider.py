"""A recording provider for paths and shapes the mock does not serve.

:class:`Scripted` answers with scripted replies (in order, then ``default``)
and records every request; the ``scripted`` fixture (``conftest.py``) starts
one per test.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Reply", "Scripted", "Seen"]


@dataclass
class Seen:
    method: str
    target: str  # path and query as received
    headers: dict[str, str]
    body: Any


@dataclass
class Reply:
    status: int = 200
    body: bytes | list[bytes] = b""  # a list is sent as a chunked event stream, in small pieces
    content_type: str = "application/json"
    piece: int = 7
    headers: tuple[tuple[str, str], ...] = ()


class Scripted:
    """A provider that answers with the scripted replies (in order) and records every request.

    Runs the standard library's threading HTTP server in a daemon thread: it
    shares no code with the proxy or the mock.
    """

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.replies: deque[Reply] = deque()
        self.default = Reply(200, b'{"object":"chat.completion","choices":[],"model":"scripted"}')
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                headers = {k.lower(): v for k, v in self.headers.items()}
                scripted.requests.append(Seen(self.command, self.path, headers, body))
                reply = scripted.replies.popleft() if scripted.replies else scripted.default
                self.send_response(reply.status)
                self.send_header("content-type", reply.content_type)
                for name, value in reply.headers:
                    self.send_header(name, value)
                if isinstance(reply.body, bytes):
                    self.send_header("content-length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                    return
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                data = b"".join(reply.body)
                for start in range(0, len(data), reply.piece):
                    piece = data[start : start + reply.piece]
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), daemon=True, name="scripted-provider"
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
