"""A bare uvloop + h11 reverse proxy: the floor of what h11 itself costs (``--baseline h11relay``).

Not product code and no features: one h11 server connection per downstream
socket (reused with ``start_next_cycle``), one keep-alive h11 client
connection to the upstream per downstream connection, the request body read
whole, the response relayed chunk by chunk as it arrives (so SSE streams
flow). Output is coalesced: bytes are written when the relay next waits for
input, so a reply read in one ``recv`` leaves in one ``send``. Run::

    python bench/h11relay.py --port 8081 --upstream 127.0.0.1:9009
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import h11
import uvloop

DROP = {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding"}
CLOSE_ERRORS = (OSError, h11.ProtocolError, asyncio.IncompleteReadError)


class Side:
    """One socket and its h11 state machine; ``out`` is sent when the relay next waits to read."""

    def __init__(
        self, role: type[h11.CLIENT | h11.SERVER], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.conn = h11.Connection(role)
        self.reader, self.writer = reader, writer
        self.out = bytearray()

    def send(self, event: h11.Event) -> None:
        self.out += self.conn.send(event) or b""

    async def flush(self) -> None:
        if self.out:
            if self.writer.is_closing():  # the peer reset: uvloop refuses writes to a closed transport
                raise ConnectionResetError
            self.writer.write(self.out)
            self.out = bytearray()
            await self.writer.drain()

    async def next_event(self, *flush_first: Side) -> object:
        """The next h11 event, reading as needed; ``flush_first`` sides send their output before a read."""
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            for side in flush_first:
                await side.flush()
            self.conn.receive_data(await self.reader.read(65536))
        return event


async def relay(down: Side, upstream: tuple[str, int]) -> None:
    """Serve one downstream connection until either side closes."""
    up: Side | None = None
    authority = f"{upstream[0]}:{upstream[1]}".encode()
    try:
        while isinstance(request := await down.next_event(), h11.Request):
            body = bytearray()
            while isinstance(event := await down.next_event(), h11.Data):
                body += event.data
            if up is None:
                up = Side(h11.CLIENT, *await asyncio.open_connection(*upstream))
            headers = [(n, v) for n, v in request.headers if n not in DROP]
            headers += [(b"host", authority), (b"content-length", b"%d" % len(body))]
            up.send(h11.Request(method=request.method, target=request.target, headers=headers))
            up.send(h11.Data(data=bytes(body)))
            up.send(h11.EndOfMessage())
            while isinstance(head := await up.next_event(up), h11.InformationalResponse):
                pass
            if not isinstance(head, h11.Response):
                return
            keep = [(n, v) for n, v in head.headers if n not in (b"connection", b"keep-alive")]
            down.send(h11.Response(status_code=head.status_code, headers=keep, reason=head.reason))
            while isinstance(event := await up.next_event(down), h11.Data):
                down.send(h11.Data(data=event.data))
            down.send(h11.EndOfMessage())
            await down.flush()
            if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
                up.conn.start_next_cycle()
            else:
                up.writer.close()
                up = None
            if down.conn.our_state is not h11.DONE or down.conn.their_state is not h11.DONE:
                return
            down.conn.start_next_cycle()
    except (*CLOSE_ERRORS, asyncio.CancelledError):  # cancelled at shutdown: end quietly (3.11 would log it)
        pass
    finally:
        for side in (down, up):
            if side is not None:
                side.writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, metavar="HOST:PORT")
    args = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")
    upstream = (host, int(port))
    tasks: set[asyncio.Task[None]] = set()  # 3.11's start_server drops its reference once the client is gone

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await relay(Side(h11.SERVER, reader, writer), upstream)
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(serve, args.host, args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(main())
