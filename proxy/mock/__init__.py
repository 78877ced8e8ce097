"""A fast, offline, fake LLM provider speaking the OpenAI, Anthropic and Gemini wire formats.

Used by the quickstart, the tests and the benchmarks, so it must never be the
bottleneck of a benchmark: it is a raw :class:`asyncio.Protocol` (run on uvloop
by :func:`serve_mock`) with a small hand-rolled HTTP/1.1 request parser, and
it caches the response bytes it can. It deliberately shares no code with the
proxy's own HTTP layer, so the two cannot hide the same framing bug.

The proxy never imports this package: it reaches it only through the
``llmproxy.mock_upstream`` entry point (:class:`MockHook`, loaded by
:mod:`llmproxy.runtime.mock_hook` when a config has ``mock_upstreams``). Modules, by
job and protocol: ``config`` (what may be set), ``wire`` (request parsing),
``plans`` (status, fault and pacing per request), ``replies`` and
``content`` (what handlers build), ``openai``, ``responses`` (OpenAI's
``/v1/responses``, streamed too, stored for ``previous_response_id``) and
``anthropic`` and ``gemini`` (``.../models/{model}:generateContent`` and
``:streamGenerateContent``, routed by path suffix) (the endpoints),
``delivery`` (heads, framing, faults applied), ``connection``
(one socket), ``server`` (routes, log, control endpoints, start and
serve), ``hook``.

Theory of operation
-------------------
::

    MockServer      1 per listening socket (server.py): MockConfig, request
     │              log, Planner (per-key fault counters), Framer, ids
     └─ Connection  N, one per socket (connection.py): RequestParser
         │          (wire.py), FIFO of parsed requests, flow control
         └─ one exchange at a time: Plan (plans.py) -> handler
                    (openai.py, anthropic.py) -> Delivery (delivery.py),
                    written at once or by one pacing task

* :class:`~.wire.RequestParser` turns bytes into ``RawRequest`` objects. Its
  readers are chosen from ``wire._READERS`` by parser state. A framing error is
  queued after the requests that preceded it, answered with 400/413/431/501
  and the connection is closed.
* Pipelined requests are parsed ahead and answered strictly in order: the
  next request starts only when the previous reply is fully written. At most
  ``connection._QUEUE_HIGH`` parsed requests wait; past that the socket stops being
  read, and no new reply starts while the transport's write buffer is full.
* A provider request is recorded in :attr:`MockServer.requests` first, then a
  :class:`~.plans.Plan` decides its pacing and its fault, then the handler
  from a protocol's ``ROUTES`` builds a ``Whole`` reply or a ``Stream`` of SSE events split
  into *preamble* (role chunk / ``message_start`` ...), *content* (one event
  per token or tool-call fragment) and *tail* (finish, usage, ``[DONE]``).
* :meth:`MockServer.respond` (through :class:`~.delivery.Framer`) turns reply,
  plan and fault into a ``Delivery``: a list of ``(delay, bytes)`` writes
  and an ending. Unpaced deliveries are written synchronously inside
  ``data_received`` with one ``transport.write``; paced ones run in one task
  per exchange, cancelled when the client goes away or the server closes.

Timing: stream headers and preamble go out at once; the first content event
after ``ttft``, each next one ``itl`` later; the tail with the last content
event. A non-streaming reply is sent whole when the last token would have
been streamed: after ``ttft + itl * (tokens - 1)``.

Faults
------
Chosen per request. Precedence: ``x-mock-status``/``x-mock-fault`` request
headers, then ``require_key`` (401), then the :class:`KeyBehaviour` of the
request's API key. A fault wins over a status when both are given.

=============  ===============================================================
``status``     that status with an error envelope (OpenAI form, or Anthropic
               form on ``/v1/messages``) and ``retry-after`` when given.
``reset``      no response byte: the socket is closed with SO_LINGER 0, so
               the client sees a TCP reset.
``stall``      stream: headers, preamble and ``stall_after`` content events,
               then silence with the connection left open. Non-stream:
               nothing at all is sent.
``drop``       stream: headers, preamble and ``stall_after`` content events,
               then the connection is closed mid-body (0 dies before the first
               content delta). Non-stream: headers and half the body, then
               closed.
``malformed``  200 with a body that is not JSON; in a stream the first
               content event is replaced by a ``data:`` line of broken JSON
               and the stream then ends normally.
=============  ===============================================================

Request headers (all optional): ``x-mock-status``, ``x-mock-retry-after``
(seconds), ``x-mock-fault``, ``x-mock-stall-after`` (content events, default
2), ``x-mock-tokens``, ``x-mock-ttft-ms``, ``x-mock-itl-ms`` and
``x-mock-tool-calls`` (N parallel tool calls when the request has ``tools``),
``x-mock-reply`` (the reply text), ``x-mock-tool-args`` (the tool calls'
arguments text), ``x-mock-chunk-chars`` (characters per streamed event) and
``x-mock-sse-framing`` (``events``, the default: an unpaced stream is one chunk
per event; ``whole``: one chunk holding every event). A bad value is answered with 400 naming the header.

Control endpoints, neither recorded nor faulted: ``GET /_mock/requests``
(the log as JSON), ``DELETE /_mock/requests`` (clear it), ``GET
/_mock/health``.
"""

from llmproxy.mock.config import FAULTS, KeyBehaviour, MockConfig, ReceivedRequest, mock_config_from_dict
from llmproxy.mock.hook import MockHook
from llmproxy.mock.server import MAX_LOG, MockServer, serve_mock, start_mock

__all__ = [
    "FAULTS",
    "MAX_LOG",
    "KeyBehaviour",
    "MockConfig",
    "MockHook",
    "MockServer",
    "ReceivedRequest",
    "mock_config_from_dict",
    "serve_mock",
    "start_mock",
]
