"""The ``guardrails`` filter: rules on what goes to the model and what comes back, streams included.

Place it **after** ``auth`` (rules scoped by principal or team read
``exchange.vars["auth.principal"]``) and **before** ``routing``: request
hooks run in chain order and response hooks in reverse, so from there the
request hook sees the client's request before routing translates it (and a
redaction goes upstream in whatever protocol routing then speaks), and the
response hooks see the client-protocol events routing has already
translated. Per exchange:

* ``on_request_body``: the rules that apply (side ``request``, the client's
  model, the principal) scan every text of the request (:mod:`.texts`).
  ``block`` refuses it with 400 ``guardrail_blocked`` in the client's
  protocol before any upstream call; ``redact`` replaces each span with
  ``[redacted:<rule>]`` and the redacted request goes upstream; ``log``
  counts and logs (rule and side, never the text). Remote checks
  (:mod:`.remote`) run next, once per request;
* ``on_response_headers``: no response rules, an error status or an API the
  filter does not know: the body is skipped. A JSON body is held whole
  (head too, for an exact Content-Length); a stream gets a
  :class:`~.stream.StreamGuard`;
* ``on_response_body``: JSON: redacted or blocked at its end. Stream: each
  batch of events is rewritten; a ``block`` span ends the stream with an
  error event in the client's protocol (raised :class:`GuardrailBlocked`:
  the core writes the event, ends the response and drops the upstream);
* ``on_exchange_complete``: hits, held characters and hold time go to the
  metrics (``llmproxy_guardrail_hits_total``,
  ``llmproxy_guardrail_held_chars``, ``llmproxy_guardrail_hold_seconds``) and
  ``exchange.vars["guardrails.held"]``.

Config::

    - name: guardrails
      config:
        window: 128              # characters a stream holds back (the bound on added delay)
        rules:
          - detector: email      # name defaults to the detector's
            action: redact       # block (default) | redact | log
            side: response       # both (default) | request | response
          - name: secrets
            detectors: [secrets] # openai_key, anthropic_key, aws_access_key, github_token,
                                 # google_api_key, slack_token, private_key, email, phone, card;
                                 # groups: secrets, pii
          - name: banned
            deny: [forbidden-word]   # case-insensitive, word-boundary aware
            side: request
          - name: ticket
            regex: 'TICKET-\\d{6}'
            ignore_case: false
            models: ["gpt-*"]        # client model patterns; principals: [...], teams: [...]
          - name: moderation
            remote: {url: http://127.0.0.1:9100/check, timeout: 0.5, failure: closed}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import orjson
from prometheus_client import Counter, Histogram

from llmproxy import (
    Action,
    BadRequest,
    ConfigError,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    Principal,
    Section,
    ServiceUnavailable,
    UpstreamTarget,
    split_events,
)
from llmproxy.filters.guardrails.remote import Verdict, call_remote, remote_target
from llmproxy.filters.guardrails.rules import RemoteCheck, Rule, RuleSet, parse_rules
from llmproxy.filters.guardrails.scanner import Blocked
from llmproxy.filters.guardrails.stream import StreamGuard
from llmproxy.filters.guardrails.texts import fix_request, fix_response
from llmproxy.filters.names import GUARDRAILS_HELD, PRINCIPAL

__all__ = ["GuardrailBlocked", "GuardrailUnavailable", "GuardrailsFactory", "GuardrailsFilter"]

log = logging.getLogger("llmproxy.guardrails")

#: Client path -> API.
_APIS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
}
_EMPTY = RuleSet(())
_MAX_SELECTIONS = 256


def _scan(rules: RuleSet, node: Any, walk: Callable[[Any, Callable[[str], str]], bool]) -> list[int]:
    """Scan every text ``walk`` visits in ``node`` in one pass; redact them in place. The rules of the spans found."""
    texts: list[str] = []

    def collect(text: str) -> str:
        texts.append(text)
        return text

    walk(node, collect)
    if not texts:
        return []
    fixed, found = rules.apply_many(texts)
    if found:
        replacements = iter(fixed)
        walk(node, lambda _text: next(replacements))
    return found


class GuardrailBlocked(BadRequest):
    """400: a ``block`` rule matched; the message names the rule, never the matched text."""

    default_code = "guardrail_blocked"


class GuardrailUnavailable(ServiceUnavailable):
    """503: a fail-closed remote check could not give a verdict."""

    default_code = "guardrail_unavailable"


class GuardrailsFilter(Filter):
    """Per-exchange state: the selected rules, the stream guard, the hits."""

    sse_batches: ClassVar[bool] = True

    __slots__ = ("api", "guard", "hits", "json_body", "response_rules")

    factory: GuardrailsFactory

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self.api = ""
        self.response_rules = _EMPTY
        self.guard: StreamGuard | None = None
        self.json_body = False
        #: (rule, side) of every span found.
        self.hits: list[tuple[Rule, str]] = []

    # -- request ------------------------------------------------------------------
    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        api = _APIS.get(exchange.client_path.partition("?")[0], "")
        self.api = api
        if not api:
            return Action.CONTINUE
        request = exchange.request_json()
        if not isinstance(request, dict):
            return Action.CONTINUE
        principal = exchange.vars.get(PRINCIPAL)
        rules, self.response_rules = self.factory.select(exchange.model, principal)
        if rules:
            found = _scan(rules, request, fix_request)
            for index in found:
                self._hit(rules.rules[index], "request")
            for index in found:
                rule = rules.rules[index]
                if rule.action == "block":
                    raise GuardrailBlocked(f"request blocked by guardrail rule '{rule.name}'")
            if any(rules.rules[index].action == "redact" for index in found):
                exchange.mark_request_json_changed()
        if rules.remote:
            return self._remote(exchange, request, rules.remote)
        return Action.CONTINUE

    async def _remote(self, exchange: Exchange, request: dict[str, Any], checks: tuple[Rule, ...]) -> Action:
        payload = {
            "model": exchange.model,
            "messages": request.get("messages", request.get("input")),
            "system": request.get("system", request.get("instructions")),
        }
        factory = self.factory
        calls: dict[tuple[str, str], Awaitable[Verdict]] = {}
        for rule in checks:
            check = rule.remote
            assert check is not None
            key = (check.settings.url, check.path)
            if key not in calls:
                target, check = factory.remote_targets[rule.name]
                calls[key] = asyncio.ensure_future(call_remote(factory.context, target, check, rule.name, payload))
        verdicts = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
        for rule in checks:
            check = rule.remote
            assert check is not None
            verdict = verdicts[(check.settings.url, check.path)]
            if verdict.failed:
                factory.remote_failures.labels(rule.name).inc()
                if check.fail_open:
                    log.warning(
                        "guardrail %s: remote check failed (%s); letting the request through", rule.name, verdict.reason
                    )
                    continue
                raise GuardrailUnavailable(f"guardrail rule '{rule.name}' could not check the request")
            if verdict.flagged:
                self._hit(rule, "request")
                if rule.action == "block":
                    raise GuardrailBlocked(f"request blocked by guardrail rule '{rule.name}'")
        return Action.CONTINUE

    # -- response -----------------------------------------------------------------
    def on_response_headers(self, exchange: Exchange) -> Action:
        self.guard = None
        self.json_body = False
        response = exchange.response
        rules = self.response_rules
        if not rules or response is None or response.status >= 400 or self.api in ("", "embeddings"):
            exchange.skip_response_body(self)
            return Action.CONTINUE
        if exchange.is_sse:
            self.guard = StreamGuard(rules, self.factory.window, self.api)
            return Action.CONTINUE
        content_type = response.headers.get("content-type") or ""
        if "json" not in content_type:
            exchange.skip_response_body(self)
            return Action.CONTINUE
        self.json_body = True
        return Action.PAUSE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        guard = self.guard
        if guard is not None:
            try:
                out = guard.feed(split_events(data)) if data else b""
                if end_of_stream:
                    out += guard.finish()
            except Blocked as exc:
                self._count_stream(guard)
                self.guard = None
                raise GuardrailBlocked(f"response blocked by guardrail rule '{exc.rule}'") from None
            if end_of_stream:
                self._count_stream(guard)
                self._publish_hold(exchange, guard)
            exchange.set_response_data(out)
            return Action.CONTINUE
        if not self.json_body:
            return Action.CONTINUE
        if not end_of_stream:
            return Action.PAUSE
        self._json_response(exchange, data)
        return Action.CONTINUE

    def _json_response(self, exchange: Exchange, data: bytes) -> None:
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        rules = self.response_rules
        api = self.api
        found = _scan(rules, body, lambda node, fix: fix_response(api, node, fix))
        for index in found:
            self._hit(rules.rules[index], "response")
        for index in found:
            if rules.rules[index].action == "block":
                raise GuardrailBlocked(f"response blocked by guardrail rule '{rules.rules[index].name}'")
        if any(rules.rules[index].action == "redact" for index in found):
            exchange.set_response_data(orjson.dumps(body))

    def _count_stream(self, guard: StreamGuard) -> None:
        rules = guard.rules.rules
        for scanner in guard.scanners():
            for index in scanner.hits:
                self._hit(rules[index], "response")
            scanner.hits.clear()

    def _publish_hold(self, exchange: Exchange, guard: StreamGuard) -> None:
        scanners = guard.scanners()
        held = max((s.max_held for s in scanners), default=0)
        wait = max((s.max_wait for s in scanners), default=0.0)
        exchange.vars[GUARDRAILS_HELD] = (held, wait)
        self.factory.held_chars.observe(held)
        self.factory.hold_seconds.observe(wait)

    def _hit(self, rule: Rule, side: str) -> None:
        self.factory.hits.labels(rule.name, rule.action, side).inc()
        if rule.action == "log":
            log.info("guardrail %s matched on the %s (logged only)", rule.name, side)
        else:
            log.info("guardrail %s matched on the %s: %s", rule.name, side, rule.action)


class GuardrailsFactory(FilterFactory):
    """Parses the rules once; caches the compiled selection per set of applicable rules."""

    filter_class = GuardrailsFilter
    fail_open: ClassVar[bool] = False

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        sec = Section(config, "", "")
        try:
            self.window = sec.get("window", int, 128, lambda v: None if 1 <= v <= 65536 else "must be in 1..65536")
            self.rules = parse_rules(sec.get("rules", list, None), "")
            sec.finish()
        except ConfigError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
        self.remote_targets: dict[str, tuple[UpstreamTarget, RemoteCheck]] = {}
        for i, rule in enumerate(self.rules):
            if rule.remote is not None:
                try:
                    target = remote_target(rule.remote, rule.name, context)
                except ValueError as exc:
                    raise ValueError(f"rules[{i}].remote.url: {exc}") from None
                self.remote_targets[rule.name] = (target, rule.remote)
        self._selections: dict[tuple[int, ...], RuleSet] = {}
        #: No rule is scoped by model, principal or team: one selection for every exchange.
        self._unscoped: tuple[RuleSet, RuleSet] | None = None
        if not any(r.models or r.principals or r.teams for r in self.rules):
            self._unscoped = self.select("", None)
        registry = context.metrics
        self.hits = Counter(
            "llmproxy_guardrail_hits",
            "Spans (or remote verdicts) guardrail rules flagged",
            ["rule", "action", "side"],
            registry=registry,
        )
        self.remote_failures = Counter(
            "llmproxy_guardrail_remote_failures", "Remote checks that gave no verdict", ["rule"], registry=registry
        )
        self.held_chars = Histogram(
            "llmproxy_guardrail_held_chars",
            "Most characters a guarded stream held back at once",
            buckets=(0, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384),
            registry=registry,
        )
        self.hold_seconds = Histogram(
            "llmproxy_guardrail_hold_seconds",
            "Longest a guarded stream held a character back",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )

    def select(self, model: str, principal: Principal | None) -> tuple[RuleSet, RuleSet]:
        """The request-side and response-side rules for ``model`` and ``principal``."""
        if self._unscoped is not None:
            return self._unscoped
        rules = self.rules
        chosen = [i for i, r in enumerate(rules) if r.applies(model, principal)]
        return (
            self._compiled(tuple(i for i in chosen if rules[i].request)),
            self._compiled(tuple(i for i in chosen if rules[i].response)),
        )

    def _compiled(self, indices: tuple[int, ...]) -> RuleSet:
        if not indices:
            return _EMPTY
        found = self._selections.get(indices)
        if found is None:
            if len(self._selections) >= _MAX_SELECTIONS:
                self._selections.clear()
            found = self._selections[indices] = RuleSet([self.rules[i] for i in indices])
        return found
