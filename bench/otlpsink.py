"""A tiny OTLP/HTTP trace receiver for the bench: accepts ``POST /v1/traces`` and counts.

The full production chain exports its spans to a live receiver; this is it.
It answers every ``POST /v1/traces`` with ``200`` and an empty protobuf
``ExportTraceServiceResponse`` (zero bytes) without decoding the body, and
counts exports and body bytes. ``GET /stats`` answers
``{"exports": N, "bytes": B}`` as JSON; ``GET /health`` answers 200.

    python bench/otlpsink.py --port 4318
"""

from __future__ import annotations

import argparse
import asyncio

import h11
import orjson

_stats = {"exports": 0, "bytes": 0}


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return
                continue
            if isinstance(event, h11.Request):
                method, target, size = event.method, event.target, 0
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                body, ctype, status = b"", b"application/x-protobuf", 200
                if method == b"POST" and target == b"/v1/traces":
                    _stats["exports"] += 1
                    _stats["bytes"] += size
                elif method == b"GET" and target == b"/stats":
                    body, ctype = orjson.dumps(_stats), b"application/json"
                elif not (method == b"GET" and target == b"/health"):
                    status = 404
                headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (h11.RemoteProtocolError, ConnectionError):
        return
    finally:
        writer.close()


async def _main(host: str, port: int) -> None:
    server = await asyncio.start_server(_serve, host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    asyncio.run(_main(args.host, args.port))


if __name__ == "__main__":
    main()
