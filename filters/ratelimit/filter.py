"""The ``ratelimit`` filter: rate limits and budgets, exact across workers and instances.

Place it after ``metering``, ``routing`` and ``failover`` (it needs
metering's settled usage and routing's choice; the chain is refused
otherwise). Per exchange, at most one store call at admission and one at
settlement:

* ``on_request_body``: match the rules (the filter's own and the
  principal's, from ``vars["auth.principal"]``; :data:`llmproxy.ANONYMOUS`
  without auth), estimate the request (prompt tokens with metering's
  tokenizer + its output cap, or ``default_max_tokens``) and *reserve* on
  every counter at once (:meth:`llmproxy.SharedStore.reserve`: one Lua
  script on Redis, on the server's clock). Refused: 429 with
  ``retry-after`` and the rate-limit fields (``insufficient_quota`` for a
  budget), before any upstream call. A hard budget grants as much output as
  it has left: ``max_tokens`` is clamped to that allowance upstream, and a
  stream is cut cleanly when it is used up (:mod:`.cut`).
* :meth:`RateLimitFilter.charge`: a reply served without the upstream (a
  ``cache`` hit with ``charge_hits``) is admitted on its exact counts and
  settled to them, from the serving filter's request hook.
* ``on_response_headers``: the rate-limit fields ride on the response.
* ``on_attempt_complete``: when the last attempt ends (completed, failed or
  abandoned: client gone, shutdown; a retried attempt only adds its usage),
  the reservation is *settled* to the metered usage of every attempt
  (:meth:`llmproxy.SharedStore.settle`): tokens to what was spent, the
  concurrency slot given back, exactly once; ``on_exchange_complete`` settles
  one that no attempt ended (a later filter answered locally).

Windows are sliding logs in 60 time buckets (:mod:`llmproxy.state.quota`):
what was admitted in any ``window`` seconds is within the limit. So the tokens admitted in any window never exceed a
limit by more than what a settlement exceeds its reservation (at most one
request's underestimate per request in flight; none when requests carry
``max_tokens``). Budgets are running totals per calendar period (UTC day or
month by the proxy's clock, or total).

Store failures: each rule says ``on_store_error: open`` (admit, the default
for limits) or ``closed`` (503, the default for budgets); both are logged
(once per 10 s) and counted in ``llmproxy_ratelimit_store_errors_total``.
A memory store with ``--workers`` > 1 would give each worker its own
counters (N times the limit): refused at startup unless ``per_worker: true``.

Cost per request: what applies to a request (the matched rules, their counter
keys, the quotas that do not depend on it, the header fields' names and
limits) is compiled once per principal, model, provider and values of the
headers the rules read (:class:`_Template`, cached by the factory; a reload
builds a new factory and new principals). On the memory store admission and
settlement are plain calls (:meth:`llmproxy.SharedStore.reserve_now`), so
the hooks are too; they return a coroutine only for a networked store or a
prompt too long to count on the loop.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from decimal import Decimal
from functools import partial
from typing import Any, ClassVar, NamedTuple

from prometheus_client import Counter, Gauge

from llmproxy import (
    ANONYMOUS,
    Action,
    Attempt,
    ConfigError,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    InvalidJSON,
    MemoryStore,
    Outcome,
    Principal,
    Quota,
    QuotaState,
    RateLimited,
    Reservation,
    Section,
    ServiceUnavailable,
    Settlement,
    StoreUnavailable,
    Usage,
)
from llmproxy.filters.metering import MeteringFactory
from llmproxy.filters.names import PRINCIPAL, ROUTE
from llmproxy.filters.ratelimit.cut import StreamCap
from llmproxy.filters.ratelimit.estimate import asks_cap, output_cap, prompt_tokens, prompt_tokens_now, set_output_cap
from llmproxy.filters.ratelimit.ledger import Ledger
from llmproxy.filters.ratelimit.rules import (
    BudgetRule,
    Facts,
    LimitRule,
    parse_budget,
    parse_limit,
    principal_rules,
)
from llmproxy.filters.ratelimit.wire import FIELD_NAMES, BudgetExceeded, FieldMaker, as_text, header_fields
from llmproxy.filters.routing import RouteDecision

__all__ = ["RateLimitFactory", "RateLimitFilter"]

log = logging.getLogger("llmproxy.ratelimit")

# Counter kinds, and what each settles to.
_REQ, _TOK, _CONC, _BTOK, _BUSD = range(5)
_KIND_NAMES = ("requests", "tokens", "concurrent", "budget_tokens", "budget_usd")
#: Principals whose own rules are kept parsed (auth filters publish one object per key).
_PRINCIPAL_CACHE = 4096
#: Compiled templates kept (principal x model x provider x header values), cleared when full.
_TEMPLATE_CACHE = 4096
#: Seconds after an admission by which the decision and budget metrics show it.
_FLUSH_DELAY = 0.25
_EMBEDDINGS = "/v1/embeddings"


#: A Quota / Settlement from a whole tuple, without the named tuple's Python-level ``__new__``
#: (made per request and counter).
_quota = partial(tuple.__new__, Quota)
_settlement = partial(tuple.__new__, Settlement)
#: Placeholder in :attr:`_Template.fixed` for a quota made per request (its amount is the estimate).
_PER_REQUEST = Quota("", 0, 0.0, 0)


class _Template:
    """The counters one kind of request is charged to, compiled once and cached by the factory.

    One template per (principal, model, provider, values of the headers the rules read): for
    each counter in rule order its kind, rule and key, and the :class:`Quota` itself where it does
    not depend on the request (rpm, concurrency: an amount of 1). A request then only makes the
    token quotas (its estimate) and the budget keys (the current period).
    """

    __slots__ = (
        "budgets_at",
        "field_makers",
        "fixed",
        "hard",
        "input_only",
        "keys",
        "kinds",
        "names",
        "needs_tokens",
        "period_keys",
        "requests_at",
        "rules",
        "settles",
        "sized",
        "tokens_at",
    )

    def __init__(self, matched: list[tuple[str, LimitRule | BudgetRule]], concurrent_hold: float) -> None:
        kinds: list[int] = []
        rules: list[LimitRule | BudgetRule] = []
        keys: list[str] = []
        fixed: list[Quota] = []
        input_only: list[bool] = []

        def add(kind: int, rule: LimitRule | BudgetRule, key: str, quota: Quota, only: bool = False) -> None:
            kinds.append(kind)
            rules.append(rule)
            keys.append(key)
            fixed.append(quota)
            input_only.append(only)

        for key, rule in matched:
            if isinstance(rule, LimitRule):
                if rule.rpm is not None:
                    add(_REQ, rule, key + "|rpm", Quota(key + "|rpm", rule.rpm, rule.window, 1))
                if rule.tpm is not None:
                    add(_TOK, rule, key + "|tpm", _PER_REQUEST, rule.tpm_counts == "input")
                if rule.concurrent is not None:
                    add(_CONC, rule, key + "|conc", Quota(key + "|conc", rule.concurrent, concurrent_hold, 1))
            elif rule.tokens is not None:
                add(_BTOK, rule, key + "|budget|", _PER_REQUEST)  # + the period's id
            else:
                add(_BUSD, rule, key + "|usd|", _PER_REQUEST)
        self.kinds = tuple(kinds)
        self.rules = tuple(rules)
        self.keys = tuple(keys)
        self.fixed = tuple(fixed)
        self.input_only = tuple(input_only)
        #: One name per matched rule, in order (an admission counts each rule once).
        self.names = tuple(rule.name for _key, rule in matched)
        #: Counters whose quota a request makes; counters a settlement replaces (all but requests).
        self.sized = tuple(i for i, kind in enumerate(kinds) if kind in (_TOK, _BTOK, _BUSD))
        self.settles = tuple(i for i, kind in enumerate(kinds) if kind != _REQ)
        self.budgets_at = tuple(i for i, kind in enumerate(kinds) if kind in (_BTOK, _BUSD))
        self.needs_tokens = bool(self.sized)
        self.hard = any(isinstance(r, BudgetRule) and r.hard and r.tokens is not None for r in rules)
        #: The requests and tokens counter the header fields tell: its index, -1 for none,
        #: None when there are several (the tightest after admission is told).
        self.requests_at = _only(kinds, _REQ)
        self.tokens_at = _only(kinds, _TOK)
        #: Budget counters: (period id, key) of the period last seen.
        self.period_keys: list[tuple[str, str] | None] = [None] * len(kinds)
        #: Client protocol -> the header fields' static parts (when the counters they tell are fixed).
        self.field_makers: dict[str, FieldMaker] = {}

    def field_maker(self, protocol: str) -> FieldMaker:
        """The header fields' maker for ``protocol``: its fixed requests and tokens counters."""
        at_requests, at_tokens = self.requests_at, self.tokens_at
        assert at_requests is not None and at_tokens is not None
        requests = self.fixed[at_requests].limit if at_requests >= 0 else None
        tokens = self.rules[at_tokens] if at_tokens >= 0 else None
        tokens_limit = tokens.tpm if isinstance(tokens, LimitRule) else None
        return FieldMaker(protocol, requests, tokens_limit, at_tokens >= 0 and self.input_only[at_tokens])


def _bounded_upstream(payload: Any, out_field: str | None, out_cap: int, allowance: int) -> bool:
    """The upstream body carries an output cap within the allowance, for one choice: the
    provider stops there itself, so the stream needs no counting cap (most streams under a
    budget with room: counting every event's text is most of a capped stream's cost)."""
    return (
        out_field is not None
        and out_cap <= allowance
        and isinstance(payload, dict)
        and payload.get("n") in (None, 1)
        and not isinstance(payload.get("generationConfig"), dict)  # Gemini: candidateCount
    )


def _only(kinds: list[int], kind: int) -> int | None:
    found = [i for i, k in enumerate(kinds) if k == kind]
    return -1 if not found else found[0] if len(found) == 1 else None


#: The template of a request no rule applies to.
_NOTHING = _Template([], 0.0)


class _Plan:
    """What one exchange reserved: its template, the quotas, the counters' states (the grants)."""

    __slots__ = ("prompt", "quotas", "states", "template")

    def __init__(self, template: _Template, prompt: int, quotas: list[Quota]) -> None:
        self.template = template
        self.prompt = prompt
        self.quotas = quotas
        #: Each counter's state after admission: its grant and slot go into the settlement.
        self.states: tuple[QuotaState, ...] = ()


class RateLimitFilter(Filter):
    """Per-exchange admission, headers, stream cap and settlement (see the module docstring)."""

    factory: RateLimitFactory
    mutates_response_body: ClassVar[bool] = True
    #: A stream's events come a read's worth at a time: the cap looks at a batch at once.
    sse_batches: ClassVar[bool] = True

    __slots__ = ("_cap", "_facts", "_fields", "_plan", "_settled", "_spent", "_unknown")

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self._plan: _Plan | None = None
        self._fields: list[tuple[bytes, bytes]] = []
        self._cap: StreamCap | None = None
        self._settled = False
        #: Usage of the attempts that ended so far.
        self._spent: Usage | None = None
        #: An attempt spent tokens nobody counted (no metering record): keep the reservation.
        self._unknown = False
        self._facts: Facts | None = None

    # -- admission --------------------------------------------------------------------
    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        """Admit or refuse: a plain call on the memory store with a prompt counted inline, a
        coroutine when the store is networked or the prompt is counted off the loop."""
        return self._admit_request(exchange, body, None)

    async def charge(self, exchange: Exchange, usage: Usage) -> None:
        """Charge a reply served without an upstream call (a ``cache`` hit) its known ``usage``.

        Called by a filter that answers locally, from its request hook. When this
        filter already admitted the exchange (it comes earlier in the chain),
        its settlement charges ``usage`` instead of the estimate. Otherwise the
        exchange is admitted now on the exact amounts (a request, ``usage``'s
        tokens, its cost; no concurrency slot: nothing is held), raising the
        same 429 as an upstream request would get (a hard budget refuses a
        reply bigger than what is left: it cannot be cut), and settled to
        ``usage`` when the exchange ends.
        """
        if self._plan is None:
            result = self._admit_request(exchange, exchange.request.body, usage)
            if not isinstance(result, Action):
                await result
        self._spent = usage

    def _admit_request(self, exchange: Exchange, body: bytes, known: Usage | None) -> Action | Awaitable[Action]:
        """Match, estimate (or take ``known``'s exact counts) and reserve; raise the refusal."""
        factory = self.factory
        principal = exchange.vars.get(PRINCIPAL)
        if not isinstance(principal, Principal):
            principal = ANONYMOUS
        route = exchange.vars.get(ROUTE)
        route = route if isinstance(route, RouteDecision) else None
        try:
            payload = exchange.request_json() if body[:1] == b"{" else None
        except InvalidJSON:
            payload = None
        model = route.requested_model if route is not None and route.requested_model else ""
        if not model and isinstance(payload, dict) and isinstance(payload.get("model"), str):
            model = payload["model"]
        facts = Facts(model, route.provider if route else "", principal.name, principal.team, exchange.request.headers)
        self._facts = facts
        template = factory.template_for(principal, facts)
        if template is _NOTHING:
            return Action.CONTINUE
        out_cap, out_field = 0, None
        prompt = 0
        upstream_model = model
        default = factory.default_max_tokens
        if known is not None:
            prompt, out_cap = known.input_tokens, known.output_tokens
            return self._admit(exchange, payload, template, prompt, out_cap, out_field, default, model, known=True)
        if template.needs_tokens:
            if exchange.client_path.startswith(_EMBEDDINGS):
                default = 0
            if isinstance(payload, dict):
                out_cap, out_field = output_cap(payload, default)
            else:
                out_cap = default
            upstream_model = (route.model if route else "") or model
            counted = prompt_tokens_now(payload, body, upstream_model)
            if counted is None:
                return self._admit_counted(exchange, payload, template, out_cap, out_field, default, upstream_model)
            prompt = counted
        return self._admit(exchange, payload, template, prompt, out_cap, out_field, default, upstream_model)

    async def _admit_counted(
        self,
        exchange: Exchange,
        payload: Any,
        template: _Template,
        out_cap: int,
        out_field: str | None,
        default: int,
        model: str,
    ) -> Action:
        """:meth:`_admit` once the prompt was counted off the loop."""
        prompt = await prompt_tokens(payload, exchange.request.body, model)
        result = self._admit(exchange, payload, template, prompt, out_cap, out_field, default, model)
        return await result if not isinstance(result, Action) else result

    def _admit(
        self,
        exchange: Exchange,
        payload: Any,
        template: _Template,
        prompt: int,
        out_cap: int,
        out_field: str | None,
        default: int,
        model: str,
        known: bool = False,
    ) -> Action | Awaitable[Action]:
        """Reserve the request's quotas; ``known``: exact counts of a reply served locally (no
        concurrency slot, no output clamp)."""
        route = exchange.vars.get(ROUTE)
        sent_cap, explicit = out_cap, out_field is not None
        if (
            explicit
            and isinstance(route, RouteDecision)
            and route.translated
            and not asks_cap(route.client_json(exchange))
        ):
            explicit, out_cap = False, min(out_cap, default)  # the translation's default, not the client's
        plan = _Plan(template, prompt, self._quotas(template, prompt, out_cap, explicit or known, hold=not known))
        store = self.factory.store
        clamp = not known
        if store.in_process:
            reservation = store.reserve_now(plan.quotas)
            self._admitted(exchange, payload, plan, reservation, sent_cap, out_field, model, clamp)
            return Action.CONTINUE
        return self._reserve(exchange, payload, plan, sent_cap, out_field, model, clamp)

    async def _reserve(
        self,
        exchange: Exchange,
        payload: Any,
        plan: _Plan,
        sent_cap: int,
        out_field: str | None,
        model: str,
        clamp: bool,
    ) -> Action:
        """Reserve on a networked store (one round trip), then as :meth:`_admitted`."""
        factory = self.factory
        try:
            reservation = await factory.store.reserve(plan.quotas)
        except StoreUnavailable as exc:
            factory.store_failed("reserve", exc)
            closed = [rule.name for rule in plan.template.rules if not rule.fail_open]
            if closed:
                factory.decisions.labels(closed[0], "store_error").inc()
                raise ServiceUnavailable(
                    "the rate-limit store is unavailable and this request's limits fail closed",
                    code="ratelimit_store_unavailable",
                    headers=[("retry-after", "1")],
                ) from None
            return Action.CONTINUE  # fail open: admitted without a reservation
        self._admitted(exchange, payload, plan, reservation, sent_cap, out_field, model, clamp)
        return Action.CONTINUE

    def _admitted(
        self,
        exchange: Exchange,
        payload: Any,
        plan: _Plan,
        reservation: Reservation,
        sent_cap: int,
        out_field: str | None,
        model: str,
        clamp: bool,
    ) -> None:
        """The store's answer: the header fields, then the refusal raised, or the plan kept
        (and, ``clamp``, a hard budget's output allowance applied)."""
        states = reservation.states
        self._fields = self._header_fields(exchange, plan.template, states)
        if not reservation.admitted:
            raise self._refusal(plan, states, exchange)
        plan.states = states
        self._plan = plan
        self.factory.admitted(plan, states)
        if clamp and plan.template.hard:
            self._clamp(exchange, payload, plan, sent_cap, out_field, model)

    def _quotas(
        self, template: _Template, prompt: int, out_cap: int, explicit_cap: bool, hold: bool = True
    ) -> list[Quota]:
        """The template's quotas for this request: its estimate on the token counters, the
        current period in the budget keys; ``hold`` False: the concurrency counters reserve
        nothing (a reply that holds no slot)."""
        quotas = list(template.fixed)
        if not hold:
            for i, kind in enumerate(template.kinds):
                if kind == _CONC:
                    quota = quotas[i]
                    quotas[i] = Quota(quota.key, quota.limit, quota.window, 0)
        estimate = prompt + out_cap
        kinds, rules, keys = template.kinds, template.rules, template.keys
        for i in template.sized:
            rule = rules[i]
            kind = kinds[i]
            if isinstance(rule, LimitRule):
                assert rule.tpm is not None
                amount = prompt if template.input_only[i] else estimate
                quotas[i] = _quota((keys[i], rule.tpm, rule.window, amount, None, None))
                continue
            period, ttl = _period(rule.period)
            made = template.period_keys[i]
            if made is None or made[0] is not period:  # a new period (its id is one object per period)
                made = template.period_keys[i] = (period, keys[i] + period)
            key = made[1]  # the same string every request: its hash is computed once
            if kind == _BTOK:
                assert rule.tokens is not None
                # hard: a request that set its output cap needs all of it; one that did not gets
                # what is left (its default estimate at most) and is capped there. Soft: admitted
                # while anything is left.
                minimum = (estimate if explicit_cap else prompt + 1) if rule.hard else 1
                quotas[i] = _quota((key, rule.tokens, 0, max(estimate, minimum), minimum, ttl))
            else:
                assert rule.usd_micros is not None
                micros = self.factory.estimate_micros(self._facts, prompt, out_cap)
                quotas[i] = Quota(key, rule.usd_micros, 0, max(micros, 1), 1, ttl)
        return quotas

    def _header_fields(
        self, exchange: Exchange, template: _Template, states: tuple[QuotaState, ...]
    ) -> list[tuple[bytes, bytes]]:
        at_requests, at_tokens = template.requests_at, template.tokens_at
        if at_requests is not None and at_tokens is not None:  # one of each at most: made once
            protocol = exchange.client_protocol
            maker = template.field_makers.get(protocol)
            if maker is None:
                maker = template.field_makers[protocol] = template.field_maker(protocol)
            return maker.fields(
                states[at_requests] if at_requests >= 0 else None, states[at_tokens] if at_tokens >= 0 else None
            )
        at_requests, at_tokens = _tightest(template.kinds, states)  # several: the tightest of each
        if at_requests < 0 and at_tokens < 0:
            return []
        return header_fields(
            exchange.client_protocol,
            states[at_requests] if at_requests >= 0 else None,
            states[at_tokens] if at_tokens >= 0 else None,
            at_tokens >= 0 and template.input_only[at_tokens],
        )

    def _refusal(self, plan: _Plan, states: tuple[QuotaState, ...], exchange: Exchange) -> RateLimited:
        factory = self.factory
        wait = 0.0
        budget: BudgetRule | None = None
        limit: LimitRule | None = None
        for quota, rule, state in zip(plan.quotas, plan.template.rules, states, strict=True):
            need = quota.amount if quota.minimum is None else quota.minimum
            if min(quota.amount, quota.limit - state.used) >= need:
                continue
            factory.decisions.labels(rule.name, "refused").inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s: ratelimit %s %r refuses %s: needs %d, %d of %d used",
                    exchange.id,
                    "budget" if isinstance(rule, BudgetRule) else "limit",
                    rule.name,
                    quota.key,
                    need,
                    state.used,
                    quota.limit,
                )
            wait = max(wait, state.retry_after)
            if isinstance(rule, BudgetRule):
                budget = budget or rule
            else:
                limit = limit or rule
        fields = as_text(self._fields)
        if budget is not None:
            return BudgetExceeded(
                f"budget '{budget.name}' is spent for this {budget.period if budget.period != 'total' else 'key'}",
                headers=fields,
            )
        assert limit is not None
        if math.isinf(wait):
            return RateLimited(
                f"request too large for limit '{limit.name}': it alone needs more than the limit allows",
                code="request_too_large",
                headers=fields,
            )
        fields.insert(0, ("retry-after", str(max(1, math.ceil(wait)))))
        return RateLimited(f"rate limit '{limit.name}' reached; retry later", headers=fields)

    def _clamp(
        self, exchange: Exchange, payload: Any, plan: _Plan, out_cap: int, out_field: str | None, model: str
    ) -> None:
        """A hard token budget granted less output than asked: clamp it upstream, cap the stream."""
        allowance: int | None = None
        prompt = plan.prompt
        template = plan.template
        for kind, rule, state in zip(template.kinds, template.rules, plan.states, strict=True):
            if kind == _BTOK and isinstance(rule, BudgetRule) and rule.hard:
                room = state.granted - prompt
                allowance = room if allowance is None else min(allowance, room)
        if allowance is None:
            return
        allowance = max(1, allowance)
        route = exchange.vars.get(ROUTE)
        asked = route.client_json(exchange) if isinstance(route, RouteDecision) else payload
        trusted = self.factory.trust_max_tokens and _bounded_upstream(payload, out_field, out_cap, allowance)
        if (not isinstance(asked, dict) or asked.get("stream")) and not trusted:
            # only a stream can be cut (the client's flag: a provider body may say it by path)
            self._cap = StreamCap(self.factory.protocol_of(exchange), model, allowance, prompt)
        if allowance < out_cap and isinstance(payload, dict):
            set_output_cap(payload, out_field, allowance)
            exchange.mark_request_json_changed()
            if isinstance(route, RouteDecision):
                route.output_cap = allowance  # routing keeps it on a retry elsewhere

    # -- response ---------------------------------------------------------------------
    def on_response_headers(self, exchange: Exchange) -> Action:
        response = exchange.response
        if response is not None and self._fields:
            names = FIELD_NAMES.get(exchange.client_protocol, FIELD_NAMES["openai"])
            response.headers.edit_raw(names, self._fields)
        cap = self._cap
        if cap is None or not exchange.is_sse or response is None or not 200 <= response.status < 300:
            exchange.skip_response_body(self)
        else:
            cap.protocol = self.factory.protocol_of(exchange)
        return Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        cap = self._cap
        if cap is None or not data:
            return Action.CONTINUE
        replaced = cap.feed_batch(data)
        if replaced is not None:
            exchange.set_response_data(replaced)
            if cap.cut and replaced:
                exchange.end_response_body()
                self.factory.cuts.inc()
        return Action.CONTINUE

    # -- settlement -------------------------------------------------------------------
    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> Awaitable[None] | None:
        if self._plan is None or self._settled:
            return None
        usage = attempt.usage
        if usage is not None:
            self._spent = usage if self._spent is None else self._spent.merged(usage)
        elif attempt.status is not None and 200 <= attempt.status < 300:
            self._unknown = True  # spent, uncounted (no metering record)
        if attempt.outcome is Outcome.RETRIED:
            return None  # another attempt follows: settle when the last one ends
        return self._settle()

    def on_exchange_complete(self, exchange: Exchange) -> Awaitable[None] | None:
        pending = self._settle() if self._plan is not None and not self._settled else None
        if self._facts is not None and exchange.usage is not None:
            self.factory.ledger.add(self._facts, exchange.usage)
        return pending

    def _settle(self) -> Awaitable[None] | None:
        """Settle the reservation (once): a plain call on the memory store, else the coroutine
        of the one round trip."""
        self._settled = True
        settlements = self._settlements()
        if not settlements:
            return None
        store = self.factory.store
        if store.in_process:
            store.settle_now(settlements)
            return None
        return self._settle_remote(settlements)

    async def _settle_remote(self, settlements: list[Settlement]) -> None:
        try:
            await self.factory.store.settle(settlements)
        except StoreUnavailable as exc:
            self.factory.store_failed("settle", exc)

    def _settlements(self) -> list[Settlement]:
        plan = self._plan
        assert plan is not None
        spent = self._spent
        unknown = self._unknown
        tokens_in = spent.input_tokens if spent is not None else 0
        tokens_all = spent.total_tokens if spent is not None else 0
        cost = spent.cost if spent is not None else None
        template = plan.template
        kinds, input_only, quotas, states = template.kinds, template.input_only, plan.quotas, plan.states
        settlements: list[Settlement] = []
        for i in template.settles:  # a request stays counted
            kind = kinds[i]
            if kind == _CONC:
                amount = 0
            elif kind == _BUSD:
                if unknown or (spent is not None and cost is None):
                    continue  # no price: the reservation stands
                amount = int(cost.total * 1_000_000) if cost is not None else 0
            elif unknown:
                continue
            else:
                amount = tokens_in if input_only[i] else tokens_all
            state = states[i]
            if amount != state.granted:
                quota = quotas[i]
                settlements.append(_settlement((quota.key, quota.window, state.slot, state.granted, amount)))
        return settlements


def _tightest(kinds: tuple[int, ...], states: tuple[QuotaState, ...]) -> tuple[int, int]:
    """The requests and the tokens counter closest to (or furthest past) its limit: their
    indices (-1: none; the first of equals)."""
    at_requests = at_tokens = -1
    for i, (kind, state) in enumerate(zip(kinds, states, strict=True)):
        if kind == _REQ:
            best = states[at_requests] if at_requests >= 0 else None
            if best is None or state.used - state.limit > best.used - best.limit:
                at_requests = i
        elif kind == _TOK:
            best = states[at_tokens] if at_tokens >= 0 else None
            if best is None or state.used - state.limit > best.used - best.limit:
                at_tokens = i
    return at_requests, at_tokens


class _RuleSet(NamedTuple):
    """The rules a principal's requests are checked against, and the headers they read."""

    limits: tuple[LimitRule, ...]
    budgets: tuple[BudgetRule, ...]
    #: Names of the headers any of them matches on or is keyed by (part of a template's cache key).
    headers: tuple[str, ...]


def _rule_set(limits: tuple[LimitRule, ...], budgets: tuple[BudgetRule, ...]) -> _RuleSet:
    names: dict[str, None] = {}
    for rule in (*limits, *budgets):
        for name, _patterns in rule.match.headers:
            names[name] = None
        for part in rule.key:
            if part.startswith("header:"):
                names[part[7:]] = None
    return _RuleSet(limits, budgets, tuple(names))


#: The current period of each kind: ``period -> (id, start, end)`` (UTC seconds), recomputed
#: when the clock leaves it (so a request pays one ``time.time()`` here, not a calendar).
_PERIODS: dict[str, tuple[str, float, float]] = {}


def _period(period: str) -> tuple[str, float | None]:
    """The budget period's id (UTC, by this proxy's clock) and the seconds its counter should live."""
    if period == "total":
        return "total", None
    now = time.time()
    current = _PERIODS.get(period)
    if current is None or not current[1] <= now < current[2]:
        current = _PERIODS[period] = _period_around(period, now)
    return current[0], current[2] - now + 86400


def _period_around(period: str, now: float) -> tuple[str, float, float]:
    """The ``day`` or ``month`` (UTC) holding ``now``: its id, start and end."""
    tm = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, 0, 0, 0))
        return time.strftime("%Y-%m-%d", tm), start, start + 86400
    start = calendar.timegm((tm.tm_year, tm.tm_mon, 1, 0, 0, 0))
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return time.strftime("%Y-%m", tm), start, calendar.timegm((year, month, 1, 0, 0, 0))


class RateLimitFactory(FilterFactory):
    """Rules, the store, metrics, the ledger and the admin page of the ``ratelimit`` filter."""

    filter_class = RateLimitFilter
    fail_open = False  # a broken limiter must not admit everything

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        sec = Section(config, "", "")
        try:
            self.default_max_tokens: int = sec.get(
                "default_max_tokens", int, 1024, lambda v: None if v >= 0 else "must be >= 0"
            )
            self.concurrent_hold: float = sec.get(
                "concurrent_hold", float, 3600.0, lambda v: None if v > 0 else "must be positive"
            )
            self.per_worker: bool = sec.get("per_worker", bool, False)
            #: A stream whose upstream request carries an output cap within its hard budget's
            #: allowance is trusted to stop there (no per-event counting); off: every capped
            #: stream is counted, for providers that ignore ``max_tokens``.
            self.trust_max_tokens: bool = sec.get("trust_max_tokens", bool, False)
            raw_rules = sec.get("rules", list, [])
            raw_budgets = sec.get("budgets", list, [])
            self.rules = tuple(parse_limit(r, f"rules[{i}]") for i, r in enumerate(raw_rules))
            self.budgets = tuple(parse_budget(b, f"budgets[{i}]") for i, b in enumerate(raw_budgets))
            sec.finish()
        except ConfigError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
        names = [r.name for r in (*self.rules, *self.budgets)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rules and budgets: name {dupes[0]!r} is used twice")
        metering = context.find_factory(MeteringFactory)
        if metering is None:
            raise ValueError("the ratelimit filter needs the metering filter before it in the chain")
        self.metering = metering
        if context.workers > 1 and isinstance(context.store, MemoryStore) and not self.per_worker:
            raise ConfigError(
                context.config_file or "<config>",
                "store",
                f"the ratelimit filter with {context.workers} workers needs a shared store (redis://...): "
                "the memory store gives each worker its own counters (limits would be "
                f"{context.workers} times too loose); set per_worker: true in its config to accept that",
            )
        self.store = context.store
        self._own = _rule_set(self.rules, self.budgets)
        self._principals: dict[Principal, _RuleSet] = {}
        #: Compiled admissions (see :meth:`template_for`); a reload builds a new factory (and
        #: publishes new principal objects), so nothing here outlives the rules it was made from.
        self._templates: dict[tuple[Any, ...], _Template] = {}
        self._store_logged = 0.0
        self.ledger = Ledger()
        registry = context.metrics
        self.decisions = Counter(
            "llmproxy_ratelimit_decisions",
            "Admission decisions by rule: admitted, refused, store_error (a fail-closed rule's 503)",
            ["rule", "decision"],
            registry=registry,
        )
        self.store_errors = Counter(
            "llmproxy_ratelimit_store_errors",
            "Store calls that failed, by operation (reserve, settle)",
            ["operation"],
            registry=registry,
        )
        self.cuts = Counter(
            "llmproxy_ratelimit_stream_cuts", "Streams ended at their hard budget's allowance", registry=registry
        )
        self.budget_used = Gauge(
            "llmproxy_ratelimit_budget_used",
            "A budget counter's value as last seen by this worker (tokens, or micro-dollars for usd budgets)",
            ["budget", "key"],
            registry=registry,
            multiprocess_mode="mostrecent",  # several workers: the latest value any of them saw
        )
        #: Label children, cached (``labels()`` costs more than the increment).
        self._admitted: dict[str, Any] = {}
        self._budget_gauges: dict[str, Any] = {}
        #: Budget counter key -> (budget name, kind, used, limit) as last seen (the admin page).
        self._budget_view: dict[str, tuple[str, int, int, int]] = {}
        #: Counted since the last :meth:`flush_metrics`: admissions by rule, budget values by key.
        self._pending_admitted: dict[_Template, int] = {}
        self._dirty_budgets: dict[str, tuple[str, int, int, int]] = {}
        self._flush_armed = False
        context.add_admin_page("/admin/ratelimit", self.admin_page)

    def rules_for(self, principal: Principal) -> _RuleSet:
        """The filter's rules and the principal's own, parsed once per principal object."""
        if not principal.limits and not principal.budgets:
            return self._own
        cached = self._principals.get(principal)
        if cached is None:
            try:
                own = principal_rules(principal.name, principal.limits, principal.budgets)
            except ConfigError as exc:
                raise ValueError(f"principal {principal.name!r}: {exc.path}: {exc.reason}") from None
            cached = _rule_set(self.rules + own[0], self.budgets + own[1])
            if len(self._principals) >= _PRINCIPAL_CACHE:
                self._principals.clear()
            self._principals[principal] = cached
        return cached

    def template_for(self, principal: Principal, facts: Facts) -> _Template:
        """The compiled counters of a request (:class:`_Template`), from the cache: matched and
        keyed once per principal, model, provider and values of the headers the rules read."""
        rules = self.rules_for(principal)
        headers = rules.headers
        if headers:
            get = facts.headers.get
            cache_key: tuple[Any, ...] = (principal, facts.model, facts.provider, *(get(h) for h in headers))
        else:
            cache_key = (principal, facts.model, facts.provider)
        template = self._templates.get(cache_key)
        if template is None:
            matched: list[tuple[str, LimitRule | BudgetRule]] = []
            for limit in rules.limits:
                key = limit.counter_key(facts)
                if key is not None:
                    matched.append((key, limit))
            for budget in rules.budgets:
                key = budget.counter_key(facts)
                if key is not None:
                    matched.append((key, budget))
            template = _Template(matched, self.concurrent_hold) if matched else _NOTHING
            if len(self._templates) >= _TEMPLATE_CACHE:
                self._templates.clear()
            self._templates[cache_key] = template
        return template

    def protocol_of(self, exchange: Exchange) -> str:
        """The protocol of the events this filter sees: the provider's (it runs before routing's translation)."""
        route = exchange.vars.get(ROUTE)
        if isinstance(route, RouteDecision) and route.provider_protocol:
            return route.provider_protocol
        return exchange.client_protocol

    def estimate_micros(self, facts: Facts | None, prompt: int, out_cap: int) -> int:
        """The price of the estimate in micro-dollars (0 when the model has no known price)."""
        model = facts.model if facts is not None else ""
        usage = Usage(input_tokens=prompt, output_tokens=out_cap, model=model, provider=facts.provider if facts else "")
        price = self.metering.price(usage, None)
        return int(price.total * 1_000_000) if price is not None else 0

    def admitted(self, plan: _Plan, states: tuple[QuotaState, ...]) -> None:
        """Count an admission: plain dict writes here, the prometheus metrics at the next flush
        (at most ``_FLUSH_DELAY`` later; a label child's ``inc`` takes a lock, per request)."""
        template = plan.template
        pending = self._pending_admitted
        pending[template] = pending.get(template, 0) + 1  # one count for each of its rules
        if template.budgets_at:
            view, dirty = self._budget_view, self._dirty_budgets
            for i in template.budgets_at:
                key, state = plan.quotas[i].key, states[i]
                view[key] = dirty[key] = (template.rules[i].name, template.kinds[i], state.used, state.limit)
        if not self._flush_armed:
            self._flush_armed = True
            asyncio.get_running_loop().call_later(_FLUSH_DELAY, self.flush_metrics)

    def flush_metrics(self) -> None:
        """Move the admissions and budget values counted since the last flush into the metrics."""
        self._flush_armed = False
        pending, self._pending_admitted = self._pending_admitted, {}
        counts: dict[str, int] = {}
        for template, admissions in pending.items():
            for name in template.names:
                counts[name] = counts.get(name, 0) + admissions
        for name, count in counts.items():
            child = self._admitted.get(name)
            if child is None:
                child = self._admitted[name] = self.decisions.labels(name, "admitted")
            child.inc(count)
        dirty, self._dirty_budgets = self._dirty_budgets, {}
        for key, (name, _kind, used, _limit) in dirty.items():
            gauge = self._budget_gauges.get(key)
            if gauge is None:
                if len(self._budget_gauges) >= _PRINCIPAL_CACHE:
                    self._budget_gauges.clear()
                gauge = self._budget_gauges[key] = self.budget_used.labels(name, key)
            gauge.set(used)
        if len(self._budget_view) > _PRINCIPAL_CACHE:
            self._budget_view.clear()

    async def close(self) -> None:
        self.flush_metrics()
        await super().close()

    def store_failed(self, operation: str, exc: StoreUnavailable) -> None:
        self.store_errors.labels(operation).inc()
        now = time.monotonic()
        if now - self._store_logged >= 10:
            self._store_logged = now
            log.warning("ratelimit store %s failed (rules fail open or closed as configured): %s", operation, exc)

    def admin_page(self) -> dict[str, Any]:
        return {
            "rules": [r.name for r in self.rules],
            "budgets_configured": [b.name for b in self.budgets],
            "budgets": [
                {
                    "budget": name,
                    "unit": "tokens" if kind == _BTOK else "usd",
                    "used": used if kind == _BTOK else str(Decimal(used) / 1_000_000),
                    "limit": limit if kind == _BTOK else str(Decimal(limit) / 1_000_000),
                }
                for name, kind, used, limit in self._budget_view.values()
            ],
            "ledger": self.ledger.view(),
        }
