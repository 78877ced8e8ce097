"""llmproxy: an asyncio HTTP/1.1 + SSE LLM gateway with a proxy-wasm-style filter chain.

This module is the public API, for builtin and third-party filters alike::

    from llmproxy import Action, Exchange, Filter, FilterFactory

Everything a filter may use is re-exported here; every other module of the
package (``llmproxy.engine``, ``llmproxy.http``, ``llmproxy.upstream``,
``llmproxy.state``, ``llmproxy.runtime``, ``llmproxy.mock``) is private and
may change without notice. An import-linter contract (``.importlinter``)
keeps the builtin filters on this API.

Layout (the data path, from the client to the provider and back):

* ``http``: the downstream HTTP/1.1 connection, strict framing, response
  heads, the SSE framer;
* ``engine``: the exchange driver (chain runner, request/attempt/relay);
* ``upstream``: the provider-side client (pool, connections, chunked decoder);
* ``state``: the shared store (memory, Redis);
* ``runtime``: config, CLI, workers, admin pages, access log;
* ``mock``: the offline mock provider, started only through its hook.
"""

from llmproxy.attempt import Attempt, Outcome
from llmproxy.context import FactoryContext
from llmproxy.errors import (
    BadRequest,
    ClientDisconnected,
    FilterFailed,
    InvalidJSON,
    ModelNotFound,
    NotFound,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    anthropic_type_for_status,
)
from llmproxy.exchange import Exchange, Request, Response
from llmproxy.filter import Action, Filter, FilterFactory
from llmproxy.headers import Headers, check_field
from llmproxy.http.sse import SseEvent, SseFramer, format_event, iter_events, parse_event, split_events
from llmproxy.principal import ANONYMOUS, Principal
from llmproxy.runtime.config import ConfigError, Section, read_upstream, read_yaml
from llmproxy.signing import RequestSigner, StreamDecoder, StreamDecoderFactory
from llmproxy.state.quota import Quota, QuotaState, Reservation, Settlement
from llmproxy.state.store import MemoryStore, SharedStore, StoreUnavailable
from llmproxy.upstream import Timeouts, UpstreamTarget
from llmproxy.usage import Cost, Source, Usage

__version__ = "0.1.0"

__all__ = [
    "ANONYMOUS",
    "Action",
    "Attempt",
    "BadRequest",
    "ClientDisconnected",
    "ConfigError",
    "Cost",
    "Exchange",
    "FactoryContext",
    "Filter",
    "FilterFactory",
    "FilterFailed",
    "Headers",
    "InvalidJSON",
    "MemoryStore",
    "ModelNotFound",
    "NotFound",
    "Outcome",
    "Principal",
    "ProxyError",
    "Quota",
    "QuotaState",
    "RateLimited",
    "Request",
    "RequestSigner",
    "Reservation",
    "Response",
    "Section",
    "ServiceUnavailable",
    "Settlement",
    "SharedStore",
    "Source",
    "SseEvent",
    "SseFramer",
    "StoreUnavailable",
    "StreamDecoder",
    "StreamDecoderFactory",
    "Timeouts",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTarget",
    "UpstreamTimeout",
    "Usage",
    "__version__",
    "anthropic_type_for_status",
    "check_field",
    "format_event",
    "iter_events",
    "parse_event",
    "read_upstream",
    "read_yaml",
    "split_events",
]
