"""llmproxy core: an asyncio HTTP/1.1 + SSE proxy with a proxy-wasm-style filter chain.

The public API for filter authors is re-exported here; everything else is
an implementation detail of its module.
"""

from .context import FactoryContext
from .errors import (
    BadRequest,
    ClientDisconnected,
    FilterFailed,
    InvalidJSON,
    NotFound,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .exchange import Exchange, Request, Response
from .filter import Action, Filter, FilterFactory
from .headers import Headers
from .sse import SseEvent, format_event, parse_event
from .store import MemoryStore, SharedStore, StoreUnavailable
from .upstream import Timeouts, UpstreamTarget

__version__ = "0.1.0"

__all__ = [
    "Action",
    "BadRequest",
    "ClientDisconnected",
    "Exchange",
    "FactoryContext",
    "Filter",
    "FilterFactory",
    "FilterFailed",
    "Headers",
    "InvalidJSON",
    "MemoryStore",
    "NotFound",
    "ProxyError",
    "RateLimited",
    "Request",
    "Response",
    "ServiceUnavailable",
    "SharedStore",
    "SseEvent",
    "StoreUnavailable",
    "Timeouts",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTarget",
    "UpstreamTimeout",
    "__version__",
    "format_event",
    "parse_event",
]
