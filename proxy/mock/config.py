"""The mock's configuration and records: what a config file or a test may set, and what it logs.

:class:`MockConfig` is the server-wide behaviour, :class:`KeyBehaviour` a
fault bound to one API key, :class:`ReceivedRequest` one logged request.
:func:`mock_config_from_dict` builds a config from a YAML mapping; its
``ValueError`` names the bad field, which the proxy's config loader turns
into ``file: mock_upstreams[i]: field: reason``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["FAULTS", "MAX_TOKENS", "KeyBehaviour", "MockConfig", "ReceivedRequest", "mock_config_from_dict"]

#: The fault names (see the package docstring, "Faults").
FAULTS: Final = frozenset({"reset", "stall", "malformed", "drop"})

# Caps on the per-request overrides, so a typo cannot exhaust memory.
MAX_TOKENS: Final = 100_000


@dataclass
class KeyBehaviour:
    """Fault behaviour bound to one API key.

    ``status`` answers that status (400-599) with an error envelope, plus a
    ``retry-after`` header when ``retry_after`` is set. ``fault`` is one of
    :data:`FAULTS` and wins over ``status``. ``times`` limits the fault to the
    first N requests carrying the key; later ones are served normally
    ("fails 500 N times then recovers"). A behaviour with neither ``status``
    nor ``fault`` only makes the key known (it passes ``require_key``).
    Raises ``ValueError`` on out-of-range values.
    """

    status: int | None = None
    retry_after: float | None = None
    times: int | None = None
    fault: str | None = None

    def __post_init__(self) -> None:
        _check_behaviour("KeyBehaviour", self.status, self.retry_after, self.times, self.fault)


@dataclass
class MockConfig:
    """Server-wide behaviour of the mock.

    ``tokens`` content words per reply, ``ttft``/``itl`` pacing in seconds
    (see the module docstring, "Timing"). ``keys`` binds faults to API keys.
    ``provider_headers`` makes reply heads as long as a hosted provider's.
    With ``require_key`` a request whose credential is in neither ``keys`` nor
    ``valid_keys`` gets 401. Replies echo the requested model, prefixed by
    ``model_prefix`` (empty by default: a plain echo); no model is required.
    Raises ``ValueError`` on negative numbers.
    """

    tokens: int = 16
    ttft: float = 0.0
    itl: float = 0.0
    keys: dict[str, KeyBehaviour] = field(default_factory=dict)
    require_key: bool = False
    valid_keys: set[str] = field(default_factory=set)
    model_prefix: str = ""
    #: Add the informational fields a hosted provider sends (request id, rate
    #: limits, CDN fields: ~20 in all) to every reply head, so that a proxy in
    #: front pays for reading them as it does in production.
    provider_headers: bool = False
    #: AWS access key id -> secret access key: Bedrock requests signed with SigV4 are checked
    #: against them (:mod:`llmproxy.mock.bedrock`); empty: signatures are not checked.
    aws_credentials: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _want_int("tokens", self.tokens, 0, MAX_TOKENS)
        _want_number("ttft", self.ttft)
        _want_number("itl", self.itl)


@dataclass(slots=True)
class ReceivedRequest:
    """One provider request as the mock received it (control endpoints excluded).

    ``headers`` maps lowercased names to values (repeated fields joined by
    ``", "``). ``credential`` is ``authorization`` without its ``Bearer``
    scheme, else ``x-api-key``, else ``api-key``. ``body`` is the parsed JSON
    object, or ``None`` when absent, invalid or not an object.
    """

    method: str
    path: str
    headers: dict[str, str]
    model: str | None
    credential: str | None
    stream: bool
    body: dict[str, Any] | None


def mock_config_from_dict(d: Mapping[str, Any]) -> MockConfig:
    """Build a :class:`MockConfig` from a YAML mapping.

    Accepted fields: ``tokens``, ``ttft``, ``itl``, ``require_key``,
    ``provider_headers``, ``valid_keys`` (list of strings), ``model_prefix`` and ``keys`` (mapping
    of API key to ``{status, retry_after, times, fault}``). Every field is
    optional. Raises ``ValueError`` naming the bad field (``keys.<key>.times``
    for a nested one) on an unknown field, a wrong type or a bad value.
    """
    if not isinstance(d, Mapping):
        raise ValueError("mock config: expected a mapping")
    known = {"tokens", "ttft", "itl", "keys", "require_key", "provider_headers", "valid_keys", "model_prefix",
             "aws_credentials"}  # fmt: skip
    for name in d:
        if name not in known:
            raise ValueError(f"{name}: unknown mock config field (expected one of {sorted(known)})")
    cfg = MockConfig()
    if "tokens" in d:
        cfg.tokens = _want_int("tokens", d["tokens"], 0, MAX_TOKENS)
    if "ttft" in d:
        cfg.ttft = _want_number("ttft", d["ttft"])
    if "itl" in d:
        cfg.itl = _want_number("itl", d["itl"])
    if "require_key" in d:
        if not isinstance(d["require_key"], bool):
            raise ValueError("require_key: expected true or false")
        cfg.require_key = d["require_key"]
    if "provider_headers" in d:
        if not isinstance(d["provider_headers"], bool):
            raise ValueError("provider_headers: expected true or false")
        cfg.provider_headers = d["provider_headers"]
    if "model_prefix" in d:
        if not isinstance(d["model_prefix"], str):
            raise ValueError("model_prefix: expected a string")
        cfg.model_prefix = d["model_prefix"]
    if "valid_keys" in d:
        keys = d["valid_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("valid_keys: expected a list of non-empty strings")
        cfg.valid_keys = set(keys)
    if "keys" in d:
        cfg.keys = _behaviours_from_dict(d["keys"])
    if "aws_credentials" in d:
        creds = d["aws_credentials"]
        if not isinstance(creds, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in creds.items()
        ):
            raise ValueError("aws_credentials: expected a mapping of access key id to secret access key")
        cfg.aws_credentials = dict(creds)
    return cfg


def _behaviours_from_dict(raw: object) -> dict[str, KeyBehaviour]:
    """Parse the ``keys`` mapping of a mock config; raise ``ValueError`` naming the field."""
    if not isinstance(raw, Mapping):
        raise ValueError("keys: expected a mapping of API key to behaviour")
    fields = {"status", "retry_after", "times", "fault"}
    out: dict[str, KeyBehaviour] = {}
    for key, spec in raw.items():
        where = f"keys.{key}"
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: API keys must be non-empty strings")
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with {sorted(fields)}")
        for name in spec:
            if name not in fields:
                raise ValueError(f"{where}.{name}: unknown field (expected one of {sorted(fields)})")
        status, retry_after, times, fault = (spec.get(name) for name in ("status", "retry_after", "times", "fault"))
        _check_behaviour(where, status, retry_after, times, fault)
        out[key] = KeyBehaviour(status, None if retry_after is None else float(retry_after), times, fault)
    return out


def _check_behaviour(where: str, status: object, retry_after: object, times: object, fault: object) -> None:
    """Raise ``ValueError`` naming ``where.<field>`` if a key behaviour field holds a bad value."""
    if status is not None:
        _want_int(f"{where}.status", status, 400, 599)
    if retry_after is not None:
        _want_number(f"{where}.retry_after", retry_after)
    if times is not None:
        _want_int(f"{where}.times", times, 0)
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"{where}.fault: expected one of {sorted(FAULTS)}, got {fault!r}")


def _want_int(where: str, value: object, lo: int, hi: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[lo, hi]``; else raise ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{where}: expected an integer {bound}, got {value!r}")
    return value


def _want_number(where: str, value: object) -> float:
    """Return ``value`` as a float if it is a number >= 0; else raise ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)
