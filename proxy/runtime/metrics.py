"""The core's exchange metrics: counted once per exchange, in one place, as plain numbers.

:meth:`ExchangeMetrics.exchange_done` is called by the exchange driver
(:func:`llmproxy.engine.cycle.run_exchange`) after the filters'
``on_exchange_complete`` hooks (so the ``metering`` filter's
``exchange.usage`` is there), on every path. It finds the exchange's
*tally* (one flat list of numbers per label set: request count, every
histogram's bucket counts and sums) with one dict lookup and adds to it:
list increments and a ``bisect`` per histogram, no prometheus_client call,
no lock. The metric families are built from the tallies when scraped
(:meth:`ExchangeMetrics.collect`, a custom collector).

With several workers (:mod:`llmproxy.runtime.multiproc`) each worker
publishes its tallies to a snapshot file in the shared metrics folder at
most :data:`PUBLISH_INTERVAL` seconds after an exchange ended (a timer armed
by the first exchange after a publish: an idle worker does no work), and
when it shuts down; a scrape sums the scraping worker's live tallies and
every other worker's latest snapshot. So a scrape is exact up to the last
:data:`PUBLISH_INTERVAL` of the other workers' traffic. Gauges (exchanges,
streams, connections) are summed over live workers only.

Histograms use the OpenTelemetry GenAI semantic conventions' buckets:

* ``llmproxy_request_duration_seconds{route,provider,model}``
  (``gen_ai.server.request.duration``);
* ``llmproxy_time_to_first_token_seconds{provider,model}`` (streams only,
  ``gen_ai.server.time_to_first_token``);
* ``llmproxy_time_per_output_token_seconds{provider,model}`` (streams with
  two output tokens or more: from the first byte to the end, per token after
  the first; ``gen_ai.server.time_per_output_token``);
* ``llmproxy_token_usage_tokens{provider,model,type}`` with ``type`` one of
  ``input``, ``output``, ``cached_input``, ``reasoning``
  (``gen_ai.client.token.usage``);
* ``llmproxy_overhead_seconds{route}``: the exchange's time minus its
  attempts' (the time spent in the proxy, not waiting on the provider).

Labels are bounded: ``route`` is a served path (or ``other``), ``model`` a
name a filter declared from its config (:class:`ModelLabels`; anything a
client made up is ``other``), ``provider`` a configured upstream's name,
``principal`` and ``team`` configured ones, ``status`` an HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from llmproxy.errors import RateLimited
from llmproxy.filters.names import PRINCIPAL

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from llmproxy.attempt import Attempt
    from llmproxy.exchange import Exchange

log = logging.getLogger("llmproxy.metrics")

__all__ = [
    "DURATION_BUCKETS",
    "OVERHEAD_BUCKETS",
    "OVERHEAD_HEADER",
    "TOKEN_BUCKETS",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "ExchangeMetrics",
    "ModelLabels",
]

#: ``gen_ai.server.request.duration`` / ``gen_ai.client.operation.duration`` (seconds).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
#: ``gen_ai.server.time_to_first_token`` (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: ``gen_ai.server.time_per_output_token`` (seconds).
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
#: ``gen_ai.client.token.usage`` (tokens).
TOKEN_BUCKETS = (
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
)
#: The proxy's own time per exchange: tens of microseconds to tens of milliseconds.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

#: The opt-in response header (``server.overhead_header``): milliseconds spent in the proxy.
OVERHEAD_HEADER = "x-llmproxy-overhead-ms"

#: The label value of a model no filter declared.
OTHER = "other"
#: The label value when there is nothing to name (no model, no provider, no principal).
NONE = "-"


class ModelLabels:
    """The model names that may appear as a ``model`` label value (one worker's).

    Filters declare the names their config knows (routing: the client-facing
    names and the upstream models they map to) through
    :meth:`llmproxy.FactoryContext.declare_models`; every other name is
    folded into ``other``, so a client sending random model names cannot
    grow the label sets.
    """

    def __init__(self) -> None:
        self.known: set[str] = set()

    def declare(self, names: Iterable[str]) -> None:
        self.known.update(n for n in names if n)

    def __call__(self, name: str | None) -> str:
        """``name`` as a label value: itself when declared, ``-`` when empty, else ``other``."""
        if not name:
            return NONE
        return name if name in self.known else OTHER


class ExchangeMetrics:
    """The core's per-exchange metrics of one worker (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None, models: ModelLabels | None = None) -> None:
        self.models = models or ModelLabels()
        self.routes: frozenset[str] = frozenset()
        self.prefixes: tuple[str, ...] = ()
        #: (route, status, provider, model, principal, team, upstream model) -> tally
        #: (the status an int; every other field a string)
        self.tallies: dict[tuple[Any, ...], list[float]] = {}
        #: Small counters: (metric, *label values) -> value (errors, attempts, retries, ...).
        self.counts: dict[tuple[str, ...], float] = {}
        self.in_flight = 0
        self.streams = 0
        self.connections = 0
        self._publish_to: str | None = None
        self._publish_armed = False
        if registry is not None:
            registry.register(self)

    def set_routes(self, routes: Iterable[str], prefixes: Iterable[str]) -> None:
        """The paths served (``route`` label values) and the prefixes of paths with an id."""
        self.routes = frozenset(routes)
        self.prefixes = tuple(prefixes)

    def route(self, path: str) -> str:
        """``path`` (query string dropped) as a ``route`` label value."""
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        if path in self.routes:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return prefix + "{id}"
        return OTHER

    # -- gauges, bumped by the core where things start and end ----------------------
    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1

    def exchange_started(self) -> None:
        self.in_flight += 1

    def stream_started(self) -> None:
        """An event stream's head went downstream (matched in :meth:`exchange_done`)."""
        self.streams += 1

    # -- once per exchange ---------------------------------------------------------
    def exchange_done(self, ex: Exchange) -> None:
        """Count ``ex`` (finished, its end hooks run) in every metric: once, on every path."""
        now = time.perf_counter()
        self.in_flight -= 1
        elapsed = now - ex.started_at
        usage = ex.usage
        history = ex.attempt_history
        known = self.models.known  # (ModelLabels.__call__, inlined: this runs per exchange)
        if usage is not None:
            provider = usage.provider or (history[-1].target.name if history else NONE)
            requested = usage.requested_model or ex.model
            upstream_model = usage.model
            upstream_model = (upstream_model if upstream_model in known else OTHER) if upstream_model else NONE
        else:
            provider = history[-1].target.name if history else NONE
            requested = ex.model
            upstream_model = ""
        requested = (requested if requested in known else OTHER) if requested else NONE
        upstream_model = upstream_model or requested
        who = ex.vars.get(PRINCIPAL)
        if who is not None:
            principal, team = who.name, who.team or NONE
        else:
            principal = team = NONE
        response = ex.response
        status = response.status if response is not None and ex.response_started else 499
        path = ex.client_path
        route = path if path in self.routes else self.route(path)
        key = (route, status, provider, requested, principal, team, upstream_model)
        tally = self.tallies.get(key)
        if tally is None:
            tally = self.tallies[key] = [0.0] * _SIZE
        tally[_N] += 1
        tally[_DUR + bisect_left(DURATION_BUCKETS, elapsed)] += 1
        tally[_DUR_SUM] += elapsed
        counts = self.counts
        upstream_time = 0.0
        if history:
            before: Attempt | None = None
            for attempt in history:
                upstream_time += (attempt.ended_at or now) - attempt.started_at
                name = attempt.target.name
                # (Enum.value is a descriptor call; _value_ is the plain attribute behind it)
                counted = ("attempts", name, attempt.outcome._value_)
                counts[counted] = counts.get(counted, 0.0) + 1
                if attempt.head_sent and attempt.is_sse:
                    self.streams -= 1  # (stream_started counted it)
                if before is not None:
                    failed = before.error
                    why = failed.code if failed is not None and failed.code else str(before.status)
                    _add(counts, ("retries", name, why))
                    if before.target.name != name:
                        _add(counts, ("fallbacks", name))
                before = attempt
        overhead = elapsed - upstream_time if elapsed > upstream_time else 0.0
        tally[_OVH + bisect_left(OVERHEAD_BUCKETS, overhead)] += 1
        tally[_OVH_SUM] += overhead
        tally[_BYTES_IN] += ex.bytes_received
        tally[_BYTES_OUT] += ex.bytes_sent
        error = ex.error
        if error is not None:
            code = error.code or "error"
            _add(counts, ("errors", code))
            if isinstance(error, RateLimited):  # refused by the proxy (a provider's 429 is relayed)
                _add(counts, ("rate_limited", principal, code))
        first = ex.first_byte_at
        if ex.is_sse and first:
            ttft = first - ex.started_at
            tally[_TTFT + bisect_left(TTFT_BUCKETS, ttft)] += 1
            tally[_TTFT_SUM] += ttft
            if usage is not None and usage.output_tokens > 1:
                per_token = (now - first) / (usage.output_tokens - 1)
                tally[_TPOT + bisect_left(TPOT_BUCKETS, per_token)] += 1
                tally[_TPOT_SUM] += per_token
        if usage is not None:
            for offset, tokens in (
                (_TOKENS[0], usage.input_tokens),
                (_TOKENS[1], usage.output_tokens),
                (_TOKENS[2], usage.cache_read_tokens),
                (_TOKENS[3], usage.reasoning_tokens),
            ):
                if tokens or offset <= _TOKENS[1]:  # input and output always; the others when there are some
                    tally[offset + bisect_left(TOKEN_BUCKETS, tokens)] += 1
                    tally[offset + _TOKEN_SLOTS] += tokens
            if usage.cost is not None:
                tally[_USD] += float(usage.cost.total)
                tally[_PRICED] += 1
        if self._publish_to is not None and not self._publish_armed:
            self._publish_armed = True
            asyncio.get_running_loop().call_later(PUBLISH_INTERVAL, self.publish)

    # -- several workers ------------------------------------------------------------
    def publish_to(self, folder: str | None) -> None:
        """Publish snapshots to ``folder`` (the shared metrics folder; None: one worker)."""
        self._publish_to = folder

    def snapshot(self) -> dict[str, Any]:
        """This worker's numbers, as one JSON-serialisable document."""
        return {
            "pid": os.getpid(),
            "tallies": [[list(k), v] for k, v in self.tallies.items()],
            "counts": [[list(k), v] for k, v in self.counts.items()],
            "gauges": [self.in_flight, self.streams, self.connections],
        }

    def publish(self) -> None:
        """Write the snapshot to the shared folder (atomically: a scrape never reads half a file)."""
        self._publish_armed = False
        folder = self._publish_to
        if folder is None:
            return
        path = os.path.join(folder, f"{_SNAPSHOT_PREFIX}{os.getpid()}{_SNAPSHOT_SUFFIX}")
        part = path + ".part"
        try:
            with open(part, "wb") as out:
                out.write(orjson.dumps(self.snapshot()))
            os.replace(part, path)
        except OSError as exc:
            log.warning("cannot publish metrics to %s: %s", folder, exc)

    def _merged(self) -> tuple[dict[tuple[Any, ...], list[float]], dict[tuple[str, ...], float], list[int]]:
        """Own tallies, plus every other worker's latest snapshot when there are several."""
        if self._publish_to is None:
            return self.tallies, self.counts, [self.in_flight, self.streams, self.connections]
        tallies = {k: list(v) for k, v in self.tallies.items()}
        counts = dict(self.counts)
        gauges = [self.in_flight, self.streams, self.connections]
        own = os.getpid()
        for name in os.listdir(self._publish_to):
            if not (name.startswith(_SNAPSHOT_PREFIX) and name.endswith(_SNAPSHOT_SUFFIX)):
                continue
            try:
                with open(os.path.join(self._publish_to, name), "rb") as f:
                    snap = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError):
                continue
            pid = int(snap["pid"])
            if pid == own:
                continue
            for k, v in snap["tallies"]:
                mine = tallies.get(tuple(k))
                if mine is None or len(mine) != len(v):
                    tallies[tuple(k)] = [float(x) for x in v]
                else:
                    for i, x in enumerate(v):
                        mine[i] += x
            for k, v in snap["counts"]:
                key = tuple(k)
                counts[key] = counts.get(key, 0.0) + v
            if _alive(pid):  # a dead worker's counts stay summed, its gauges do not
                gauges = [a + b for a, b in zip(gauges, snap["gauges"], strict=True)]
        return tallies, counts, gauges

    # -- scrape ---------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """The metric families (see the module docstring), built from the tallies."""
        tallies, counts, gauges = self._merged()
        requests = CounterMetricFamily(
            "llmproxy_requests",
            "Exchanges finished, by route, response status (499: the client went away first), "
            "provider, client-facing model and principal",
            labels=["route", "status", "provider", "model", "principal"],
        )
        for labels, value in _group(tallies, (0, 1, 2, 3, 4), _N):
            requests.add_metric(labels, value)
        yield requests
        yield _counter(counts, "errors", "llmproxy_errors", "Exchanges that ended with an error, by code", ["code"])
        yield _counter(
            counts,
            "attempts",
            "llmproxy_upstream_attempts",
            "Upstream attempts, retries included, by provider and outcome (completed, retried, failed, abandoned)",
            ["provider", "outcome"],
        )
        yield _counter(
            counts,
            "retries",
            "llmproxy_retries",
            "Attempts after the first, by the provider retried on and why the attempt before ended "
            "(its status, or its error code)",
            ["provider", "reason"],
        )
        yield _counter(
            counts,
            "fallbacks",
            "llmproxy_fallbacks",
            "Attempts sent to another provider than the attempt before, by the provider fallen back to",
            ["provider"],
        )
        yield _counter(
            counts,
            "rate_limited",
            "llmproxy_rate_limited",
            "Requests refused with 429 by the proxy (rate limits; spent budgets: code insufficient_quota), "
            "by principal and code",
            ["principal", "code"],
        )
        spent = CounterMetricFamily(
            "llmproxy_spent_tokens",
            "Tokens metered, by principal, team, client-facing model and type",
            labels=["principal", "team", "model", "type"],
        )
        for i, kind in enumerate(TOKEN_TYPES):
            for labels, value in _group(tallies, (4, 5, 3), _TOKENS[i] + _TOKEN_SLOTS):
                if value:
                    spent.add_metric([*labels, kind], value)
        yield spent
        usd = CounterMetricFamily(
            "llmproxy_spent_usd",
            "US dollars spent (priced models only), by principal, team and client-facing model",
            labels=["principal", "team", "model"],
        )
        for labels, value in _group(tallies, (4, 5, 3), _USD, only_if=_PRICED):
            usd.add_metric(labels, value)
        yield usd
        yield CounterMetricFamily(
            "llmproxy_received_bytes", "Request body bytes received", value=sum(t[_BYTES_IN] for t in tallies.values())
        )
        yield CounterMetricFamily(
            "llmproxy_sent_bytes", "Response body bytes sent", value=sum(t[_BYTES_OUT] for t in tallies.values())
        )
        yield GaugeMetricFamily("llmproxy_in_flight", "Exchanges in progress", value=gauges[0])
        yield GaugeMetricFamily("llmproxy_streams_in_flight", "Event streams being relayed to clients", value=gauges[1])
        yield GaugeMetricFamily("llmproxy_connections", "Client connections open", value=gauges[2])
        yield _histogram(
            tallies,
            "llmproxy_request_duration_seconds",
            "Exchange duration, from the request head to the response's end",
            ["route", "provider", "model"],
            (0, 2, 6),
            _DUR,
            DURATION_BUCKETS,
        )
        yield _histogram(
            tallies,
            "llmproxy_time_to_first_token_seconds",
            "Streams: time from the request head to the first response byte sent",
            ["provider", "model"],
            (2, 6),
            _TTFT,
            TTFT_BUCKETS,
        )
        yield _histogram(
            tallies,
            "llmproxy_time_per_output_token_seconds",
            "Streams: time from the first response byte to the end, per output token after the first",
            ["provider", "model"],
            (2, 6),
            _TPOT,
            TPOT_BUCKETS,
        )
        tokens = HistogramMetricFamily(
            "llmproxy_token_usage_tokens",
            "Tokens per exchange, by provider, upstream model and type (input, output, cached_input, reasoning)",
            labels=["provider", "model", "type"],
        )
        for i, kind in enumerate(TOKEN_TYPES):
            _add_histograms(tokens, tallies, (2, 6), _TOKENS[i], TOKEN_BUCKETS, (kind,))
        yield tokens
        yield _histogram(
            tallies,
            "llmproxy_overhead_seconds",
            "Time spent in the proxy per exchange: its duration minus its upstream attempts'",
            ["route"],
            (0,),
            _OVH,
            OVERHEAD_BUCKETS,
        )


#: Token types of ``llmproxy_token_usage_tokens`` and ``llmproxy_spent_tokens``, in tally order.
TOKEN_TYPES = ("input", "output", "cached_input", "reasoning")

#: Seconds after an exchange by which another worker's scrape sees it (several workers).
PUBLISH_INTERVAL = 1.0
_SNAPSHOT_PREFIX = "llmproxy-exchanges-"
_SNAPSHOT_SUFFIX = ".json"

# The layout of a tally: one flat list of floats (bucket counts are per bucket, not cumulative;
# each histogram has one slot per bound, one for +Inf, then its sum).
_N = 0
_DUR = 1
_DUR_SUM = _DUR + len(DURATION_BUCKETS) + 1
_OVH = _DUR_SUM + 1
_OVH_SUM = _OVH + len(OVERHEAD_BUCKETS) + 1
_TTFT = _OVH_SUM + 1
_TTFT_SUM = _TTFT + len(TTFT_BUCKETS) + 1
_TPOT = _TTFT_SUM + 1
_TPOT_SUM = _TPOT + len(TPOT_BUCKETS) + 1
_TOKEN_SLOTS = len(TOKEN_BUCKETS) + 1
_TOKENS = tuple(_TPOT_SUM + 1 + i * (_TOKEN_SLOTS + 1) for i in range(len(TOKEN_TYPES)))
_USD = _TOKENS[-1] + _TOKEN_SLOTS + 1
_PRICED = _USD + 1
_BYTES_IN = _PRICED + 1
_BYTES_OUT = _BYTES_IN + 1
_SIZE = _BYTES_OUT + 1


def _add(counts: dict[tuple[str, ...], float], key: tuple[str, ...]) -> None:
    counts[key] = counts.get(key, 0.0) + 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group(
    tallies: dict[tuple[Any, ...], list[float]], fields: tuple[int, ...], slot: int, only_if: int | None = None
) -> list[tuple[list[str], float]]:
    """``tallies[*][slot]`` summed by the key fields ``fields`` (sorted by labels)."""
    out: dict[tuple[str, ...], float] = {}
    seen: set[tuple[str, ...]] = set()
    for key, tally in tallies.items():
        labels = tuple(key[i] for i in fields)
        if only_if is None or tally[only_if]:
            out[labels] = out.get(labels, 0.0) + tally[slot]
            seen.add(labels)
    return [([str(v) for v in labels], out[labels]) for labels in sorted(seen)]


def _counter(
    counts: dict[tuple[str, ...], float], metric: str, name: str, doc: str, labels: list[str]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(counts.items()):
        if key[0] == metric:
            family.add_metric(list(key[1:]), value)
    return family


def _add_histograms(
    family: HistogramMetricFamily,
    tallies: dict[tuple[Any, ...], list[float]],
    fields: tuple[int, ...],
    start: int,
    bounds: tuple[float, ...],
    extra: tuple[str, ...] = (),
) -> None:
    width = len(bounds) + 1
    merged: dict[tuple[Any, ...], list[float]] = {}
    for key, tally in tallies.items():
        labels = tuple(key[i] for i in fields)
        part = tally[start : start + width + 1]
        if not any(part[:width]):
            continue
        acc = merged.get(labels)
        if acc is None:
            merged[labels] = list(part)
        else:
            for i, x in enumerate(part):
                acc[i] += x
    for labels, acc in sorted(merged.items()):
        running = 0.0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*(repr(float(b)) for b in bounds), "+Inf"), acc[:width], strict=True):
            running += count
            buckets.append((bound, running))
        family.add_metric([*labels, *extra], buckets, acc[width])


def _histogram(
    tallies: dict[tuple[Any, ...], list[float]],
    name: str,
    doc: str,
    labels: list[str],
    fields: tuple[int, ...],
    start: int,
    bounds: tuple[float, ...],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    _add_histograms(family, tallies, fields, start, bounds)
    return family


def overhead_ms(ex: Exchange) -> float:
    """Milliseconds of ``ex`` spent in the proxy so far, for the response head being sent now.

    The time before the current attempt went upstream (request hooks, earlier
    attempts' hooks) plus the time since its response head arrived; earlier
    attempts' own upstream time is not counted. A filter holding a stream's
    head until its first event (failover) makes that wait part of it.
    """
    now = time.perf_counter()
    attempt = ex.attempt
    if attempt is None:
        return (now - ex.started_at) * 1000
    earlier = sum(a.duration for a in ex.attempt_history[:-1])
    before = attempt.started_at - ex.started_at - earlier
    after = now - (attempt.responded_at or now)
    return max(0.0, before + after) * 1000
