"""The routing table: providers, model mapping, aliases, built once from config.

Config (the ``routing`` filter's section)::

    providers:
      - name: openai                 # required, unique
        type: openai                 # required: openai | azure | anthropic | gemini | bedrock | vertex | a preset
        base_url: https://api.openai.com/v1   # required but for presets and cloud types (mock://NAME/v1 for a mock)
        keys: ["${OPENAI_API_KEY}"]  # or key: "..."; empty values are ignored
        models:                      # list of names served as-is, or a mapping
          gpt-4o: gpt-4o             #   exact name -> provider's name
          "gpt-4*": ""               #   prefix pattern ("" keeps the client's name)
          "*": gpt-4o-mini           #   anything else
        weight: 1                    # share among providers serving the same model
        priority: 0                  # lower first: a higher number is a fallback, used
                                     # only when every lower-priority provider failed
        headers: {x-extra: v}        # sent to this provider
        timeouts: {connect: 5, headers: 300, idle: 60, total: 900}
        tls: {verify: true, ca_file: ...}
        # adapter options: api_version (azure), anthropic_version and
        # default_max_tokens (anthropic)
    aliases:                         # virtual model names -> weighted targets
      smart:
        - {provider: anthropic, model: claude-sonnet-4-5, weight: 3}
        - {provider: openai, model: gpt-4o, weight: 1}

Model mapping follows Higress's modelMapping: an exact name wins, then the
longest matching ``prefix*`` pattern, then ``*``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmproxy import ConfigError, Section, UpstreamTarget, read_upstream
from llmproxy.filters.routing.adapters import ADAPTERS, Adapter

__all__ = ["ModelMap", "Provider", "RoutingTable", "Target", "key_id"]

_COMMON_KEYS = {
    "name",
    "type",
    "base_url",
    "key",
    "keys",
    "needs_key",
    "models",
    "weight",
    "priority",
    "headers",
    "timeouts",
    "tls",
}


def key_id(key: str) -> str:
    """A short, stable, non-reversible id for a credential (for logs, metrics, store keys)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class ModelMap:
    """Client model name -> provider model name (exact, ``prefix*``, ``*``)."""

    def __init__(self, exact: Mapping[str, str], prefixes: Sequence[tuple[str, str]], wildcard: str | None) -> None:
        self.exact = dict(exact)
        self.prefixes = sorted(prefixes, key=lambda p: len(p[0]), reverse=True)
        self.wildcard = wildcard

    @classmethod
    def parse(cls, raw: Any, where: str) -> ModelMap:
        if isinstance(raw, list):
            raw = {str(name): "" for name in raw}
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError(f"{where}: must be a non-empty list of model names or a mapping")
        exact: dict[str, str] = {}
        prefixes: list[tuple[str, str]] = []
        wildcard: str | None = None
        for pattern, target in raw.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{where}: model patterns must be non-empty strings")
            target = "" if target is None else target
            if not isinstance(target, str):
                raise ValueError(f"{where}.{pattern}: must be the provider's model name (a string)")
            if pattern == "*":
                wildcard = target
            elif pattern.endswith("*"):
                if "*" in pattern[:-1]:
                    raise ValueError(f"{where}.{pattern}: only a trailing '*' is supported")
                prefixes.append((pattern[:-1], target))
            elif "*" in pattern:
                raise ValueError(f"{where}.{pattern}: only a trailing '*' is supported")
            else:
                exact[pattern] = target
        return cls(exact, prefixes, wildcard)

    def resolve(self, model: str) -> str | None:
        """The provider's name for ``model``, or None when this map does not serve it."""
        target = self.exact.get(model)
        if target is None:
            for prefix, mapped in self.prefixes:
                if model.startswith(prefix):
                    target = mapped
                    break
            else:
                target = self.wildcard
        if target is None:
            return None
        return target or model

    def listed(self) -> list[str]:
        """The exact client-facing names (patterns cannot be listed)."""
        return list(self.exact)

    def sends(self, upstream_model: str) -> bool:
        """Whether some client name maps to ``upstream_model`` (the name the provider is asked for).

        True for a target of the map, an exact client name of it (a typo in an
        alias is then still caught), or a name that a kept-name entry (``""``
        target) covers: a matching ``prefix*``, or ``*``.
        """
        if upstream_model in self.exact.values() or upstream_model in self.exact:
            return True
        for prefix, target in self.prefixes:
            if target == upstream_model or (target == "" and upstream_model.startswith(prefix)):
                return True
        return self.wildcard is not None and self.wildcard in ("", upstream_model)


@dataclass(eq=False)
class Provider:
    """One configured provider with one upstream target per API key."""

    name: str
    adapter: Adapter
    models: ModelMap
    weight: float
    targets: tuple[UpstreamTarget, ...]
    key_ids: tuple[str, ...]
    priority: int = 0
    _next_key: int = field(default=0, repr=False)

    @property
    def protocol(self) -> str:
        return self.adapter.protocol

    @property
    def has_keys(self) -> bool:
        return bool(self.targets)

    def next_key_index(self) -> int:
        """Round-robin over this provider's keys."""
        index = self._next_key % len(self.targets)
        self._next_key = index + 1
        return index

    def __repr__(self) -> str:
        return f"<Provider {self.name} type={self.adapter.type_name} keys={len(self.targets)}>"


@dataclass(frozen=True)
class Target:
    """A routing candidate: a provider and the model name it is asked for."""

    provider: Provider
    model: str
    weight: float


class NoProvider(Exception):
    """Raised by :meth:`RoutingTable.candidates`: ``reason`` is ``unknown`` or ``no_key``."""

    def __init__(self, reason: str, providers: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.providers = tuple(providers)


def _serves(provider: Provider, api: str) -> bool:
    native = provider.adapter.native_apis
    if api in native:
        return True
    # chat <-> messages are translated both ways; responses is bridged to either
    if api == "responses":
        return "chat" in native or "messages" in native
    return (api == "chat" and "messages" in native) or (api == "messages" and "chat" in native)


class RoutingTable:
    """Providers and aliases; answers "who can serve this model for this API"."""

    def __init__(
        self, providers: Sequence[Provider], aliases: Mapping[str, Sequence[Target]], rng: random.Random | None = None
    ) -> None:
        self.providers = {p.name: p for p in providers}
        self.aliases = {name: tuple(targets) for name, targets in aliases.items()}
        self._rng = rng or random.Random()

    def candidates(self, model: str, api: str, pin: str | None = None) -> list[Target]:
        """Targets able to serve ``model`` on ``api``, in preference order.

        The order is a weighted random permutation (the first element is
        the weighted choice; the rest are the fallbacks, also by weight).
        Providers without keys are left out; ``NoProvider("no_key")`` names
        them when nothing else remains, ``NoProvider("unknown")`` means no
        provider serves the model at all.
        """
        alias = self.aliases.get(model)
        if alias is not None:
            found = [t for t in alias if _serves(t.provider, api)]
        else:
            found = []
            for provider in self.providers.values():
                mapped = provider.models.resolve(model)
                if mapped is not None and _serves(provider, api):
                    found.append(Target(provider, mapped, provider.weight))
        if pin is not None:
            found = [t for t in found if t.provider.name == pin]
        if not found:
            raise NoProvider("unknown")
        usable = [t for t in found if t.provider.has_keys]
        if not usable:
            raise NoProvider("no_key", [t.provider.name for t in found])
        return self._weighted_order(usable)

    def _weighted_order(self, targets: list[Target]) -> list[Target]:
        if len(targets) == 1:
            return targets
        priorities = sorted({t.provider.priority for t in targets})
        if len(priorities) > 1:
            return [
                t for p in priorities for t in self._weighted_order([t for t in targets if t.provider.priority == p])
            ]
        rest = list(targets)
        ordered: list[Target] = []
        while rest:
            total = sum(t.weight for t in rest)
            pick = self._rng.random() * total
            for i, t in enumerate(rest):
                pick -= t.weight
                if pick < 0 or i == len(rest) - 1:
                    ordered.append(rest.pop(i))
                    break
        return ordered

    def owner_of(self, model: str) -> str | None:
        """Who serves ``model`` (an alias: ``llmproxy``; else the first provider whose models
        match it, patterns included), or None when nothing here serves it."""
        if model in self.aliases:
            return "llmproxy"
        for provider in self.providers.values():
            if provider.models.resolve(model) is not None:
                return provider.name
        return None

    def responses_provider(self) -> Provider | None:
        """The one provider (with keys) that serves ``/v1/responses`` itself, or None when there
        are none or several (a stored response's id does not say which provider made it)."""
        native = [p for p in self.providers.values() if "responses" in p.adapter.native_apis and p.has_keys]
        return native[0] if len(native) == 1 else None

    def model_ids(self) -> list[tuple[str, str]]:
        """(model id, owner) for GET /v1/models: exact names and aliases."""
        seen: dict[str, str] = {}
        for provider in self.providers.values():
            for name in provider.models.listed():
                seen.setdefault(name, provider.name)
        for alias in self.aliases:
            seen.setdefault(alias, "llmproxy")
        return list(seen.items())


def _provider(raw: Any, where: str, mock_ports: Mapping[str, tuple[str, int]]) -> Provider:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: is required")
    kind = raw.get("type")
    adapter_cls = ADAPTERS.get(kind) if isinstance(kind, str) else None
    if adapter_cls is None:
        raise ValueError(f"{where}.type: must be one of {', '.join(sorted(ADAPTERS))}, not {kind!r}")
    unknown = set(raw) - _COMMON_KEYS - set(adapter_cls.extra_options)
    if unknown:
        allowed = sorted(_COMMON_KEYS | set(adapter_cls.extra_options))
        raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key for type {kind} (allowed: {', '.join(allowed)})")
    try:
        adapter = adapter_cls({k: raw[k] for k in adapter_cls.extra_options if k in raw})
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
    base_url = raw.get("base_url") or adapter.default_base_url()
    if not isinstance(base_url, str) or not base_url:
        raise ValueError(f"{where}.base_url: is required")
    try:
        settings = read_upstream(
            {"url": base_url, "headers": raw.get("headers"), "timeouts": raw.get("timeouts"), "tls": raw.get("tls")},
            where,
            "",
        )
        base = settings.target(name, mock_ports)
    except ConfigError as exc:
        raise ValueError(f"{exc.path.replace(where + '.url', where + '.base_url')}: {exc.reason}") from None
    keys_raw = raw.get("keys", [raw["key"]] if "key" in raw else adapter.default_keys())
    if isinstance(keys_raw, str):
        keys_raw = [keys_raw]
    if not isinstance(keys_raw, list) or not all(isinstance(k, str) for k in keys_raw):
        raise ValueError(f"{where}.keys: must be a list of strings (use ${{ENV}} references)")
    keys = [k.strip() for k in keys_raw if k and k.strip()]
    if any(not k.isprintable() or " " in k for k in keys):
        raise ValueError(f"{where}.keys: a key contains whitespace or control characters")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}.keys: duplicate key")
    needs_key = raw.get("needs_key", adapter_cls.needs_key)
    if not isinstance(needs_key, bool):
        raise ValueError(f"{where}.needs_key: must be true or false")
    if not keys and needs_key:
        raise ValueError(
            f"{where}.keys: provider {name!r} has no key (every entry is empty after ${{VAR}} interpolation: "
            "is its variable set?); a server that takes no key: needs_key: false"
        )
    weight = raw.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ValueError(f"{where}.weight: must be a number greater than 0")
    models = ModelMap.parse(raw.get("models"), f"{where}.models")
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"{where}.priority: must be an integer (lower is tried first)")
    targets = tuple(
        UpstreamTarget(
            name=name,
            scheme=base.scheme,
            host=base.host,
            port=base.port,
            base_path=base.base_path,
            headers=base.headers + (adapter.credential_headers(k) if k else ()),
            timeouts=base.timeouts,
            verify=base.verify,
            ca_file=base.ca_file,
            host_header=base.host_header,
            key_id=key_id(k) if k else "",
            **adapter.target_extras(k),
        )
        for k in keys or [""]  # (needs_key: false and no key: one target that sends none)
    )
    return Provider(name, adapter, models, float(weight), targets, tuple(t.key_id for t in targets), priority=priority)


def build_table(config: Mapping[str, Any], mock_ports: Mapping[str, tuple[str, int]]) -> RoutingTable:
    """Validate the routing section and build the table; raises ValueError("field: reason")."""
    sec = Section(config, "", "")
    try:
        providers_raw = sec.get("providers", list, None)
        aliases_raw = sec.get("aliases", dict, {})
        sec.finish()
    except ConfigError as exc:
        raise ValueError(f"{exc.path}: {exc.reason}") from None
    if not providers_raw:
        raise ValueError("providers: at least one provider is required")
    providers: list[Provider] = []
    for i, raw in enumerate(providers_raw):
        provider = _provider(raw, f"providers[{i}]", mock_ports)
        if any(p.name == provider.name for p in providers):
            raise ValueError(f"providers[{i}].name: duplicate provider name {provider.name!r}")
        providers.append(provider)
    by_name = {p.name: p for p in providers}
    aliases: dict[str, list[Target]] = {}
    for alias, targets_raw in aliases_raw.items():
        where = f"aliases.{alias}"
        if not isinstance(targets_raw, list) or not targets_raw:
            raise ValueError(f"{where}: must be a non-empty list of {{provider, model, weight}}")
        targets: list[Target] = []
        for j, item in enumerate(targets_raw):
            at = f"{where}[{j}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{at}: must be a mapping with provider, model and weight")
            unknown = set(item) - {"provider", "model", "weight"}
            if unknown:
                raise ValueError(f"{at}.{sorted(unknown)[0]}: unknown key (allowed: model, provider, weight)")
            alias_provider = by_name.get(str(item.get("provider")))
            if alias_provider is None:
                raise ValueError(
                    f"{at}.provider: unknown provider {item.get('provider')!r} (known: {', '.join(by_name)})"
                )
            model = item.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError(f"{at}.model: is required")
            weight = item.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise ValueError(f"{at}.weight: must be a number greater than 0")
            if not alias_provider.models.sends(model):
                raise ValueError(
                    f"{at}.model: provider {alias_provider.name!r} does not serve {model!r} "
                    "(an alias names the model the provider is asked for: a name or target of its models map, "
                    "or a name a kept-name pattern covers)"
                )
            targets.append(Target(alias_provider, model, float(weight)))
        aliases[str(alias)] = targets
    return RoutingTable(providers, aliases)
