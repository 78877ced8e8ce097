"""Loading and validating ``conf.yaml``.

The file is read with PyYAML's safe loader; every string may use
``${VAR}`` or ``${VAR:-default}`` (``$$`` is a literal ``$``) so secrets
stay in the environment. Validation is strict: an unknown key, a wrong type
or an impossible value stops startup with a :class:`ConfigError` naming the
file, the field path (``limits.max_body_bytes``, ``filters[1].config.x``)
and the reason. Filter sections are validated by the filters' own factories
when the chain is built (:mod:`llmproxy.runtime.app`), with the same error format.

Top-level sections: ``server``, ``limits``, ``upstream``, ``pool``,
``store``, ``mock_upstreams``, ``filters`` (the README has the reference).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from llmproxy.limits import Limits
from llmproxy.upstream import Timeouts, UpstreamTarget

__all__ = [
    "Config",
    "ConfigError",
    "FilterSpec",
    "MockSpec",
    "Section",
    "ServerSettings",
    "UpstreamSettings",
    "cpu_count",
    "load_config",
    "parse_config",
    "read_upstream",
    "read_yaml",
]


class ConfigError(Exception):
    """A config problem: ``file: field.path: reason``."""

    def __init__(self, file: str, path: str, reason: str) -> None:
        self.file = file
        self.path = path
        self.reason = reason
        where = f"{file}: {path}: " if path else f"{file}: "
        super().__init__(where + reason)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    access_log: str = "text"  # text | json | off
    log_level: str = "info"
    validate_json: bool = True
    admin_allow: tuple[str, ...] = ("127.0.0.1", "::1")
    #: Where ``serve`` writes its pid (the supervisor's with workers) for ``llmproxy reload``.
    pid_file: str | None = None
    #: Relayed responses carry ``x-llmproxy-overhead-ms`` (time spent in the proxy).
    overhead_header: bool = False
    #: With several workers: ``shared`` (one listening socket, opened by the supervisor and
    #: inherited by every worker: a worker that dies leaves no accepted-but-unserved
    #: connections behind) or ``reuseport`` (a socket per worker with SO_REUSEPORT: the kernel
    #: spreads connections, but those queued on a killed worker's socket are reset).
    listen: str = "shared"


@dataclass(frozen=True)
class UpstreamSettings:
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    verify: bool = True
    ca_file: str | None = None

    def target(self, name: str, mock_ports: Mapping[str, tuple[str, int]]) -> UpstreamTarget:
        """Build an :class:`UpstreamTarget`, resolving ``mock://NAME`` to a started mock."""
        url = self.url
        if url.startswith("mock://"):
            mock_name, _, path = url[len("mock://") :].partition("/")
            if mock_name not in mock_ports:
                raise ValueError(f"no mock_upstreams entry named {mock_name!r}")
            host, port = mock_ports[mock_name]
            url = f"http://{host}:{port}/{path}"
        return UpstreamTarget.from_url(
            name,
            url,
            headers=tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers),
            timeouts=self.timeouts,
            verify=self.verify,
            ca_file=self.ca_file,
        )


@dataclass(frozen=True)
class PoolSettings:
    max_per_origin: int = 256
    keepalive_expiry: float = 30.0


@dataclass(frozen=True)
class MockSpec:
    name: str
    host: str
    port: int
    options: Mapping[str, Any]


@dataclass(frozen=True)
class FilterSpec:
    name: str
    config: Mapping[str, Any]
    path: str  # "filters[2]", for error messages


@dataclass(frozen=True)
class Config:
    file: str
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: Limits = field(default_factory=Limits)
    upstream: UpstreamSettings | None = None
    pool: PoolSettings = field(default_factory=PoolSettings)
    store: str = "memory"
    mock_upstreams: tuple[MockSpec, ...] = ()
    filters: tuple[FilterSpec, ...] = ()


# -- interpolation -------------------------------------------------------------
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, path: str, file: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        if "$" not in value:
            return value

        def sub(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                file, path, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"
            )

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(path, str(k)), file, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", file, env) for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- typed field readers -------------------------------------------------------
_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}


class Section:
    """Reads one mapping, remembering which keys were used to refuse the rest.

    Public so that filters can validate their own config sections with the
    same rules and messages (``ConfigError`` carries ``path`` and ``reason``).
    """

    def __init__(self, data: Any, path: str, file: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(file, path, f"must be a mapping, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.path = path
        self.file = file
        self.used: set[str] = set()

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.file, _join(self.path, key), reason)

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any, check: Callable[[Any], str | None] | None = None
    ) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool and (kind is int or kind is float):
            raise self.error(key, f"must be {_KIND_NAMES[kind]}, not a boolean")
        if not isinstance(value, kind):
            # Values from ${VAR} arrive as strings: accept them for numbers and booleans.
            value = self._coerce(key, value, kind)
        if check is not None:
            reason = check(value)
            if reason:
                raise self.error(key, reason)
        return value

    def _coerce(self, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        if isinstance(value, str):
            text = value.strip()
            try:
                if kind is int:
                    return int(text)
                if kind is float:
                    return float(text)
                if kind is bool and text.lower() in ("true", "false", "yes", "no", "1", "0"):
                    return text.lower() in ("true", "yes", "1")
            except ValueError:
                pass
        raise self.error(key, f"must be {names}, not {type(value).__name__} {value!r}")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(str(unknown[0]), f"unknown key (allowed: {', '.join(sorted(self.used))})")


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number (0-65535)"


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _access_log_mode(sec: Section) -> str:
    # YAML reads a bare `off` / `on` as a boolean
    raw = sec.data.get("access_log")
    if isinstance(raw, bool):
        sec.used.add("access_log")
        return "text" if raw else "off"
    return str(sec.get("access_log", str, "text", _one_of("text", "json", "off")))


def _read_timeouts(data: Any, path: str, file: str) -> Timeouts:
    sec = Section(data, path, file)
    defaults = Timeouts()
    values = {f.name: sec.get(f.name, float, getattr(defaults, f.name), _positive) for f in fields(Timeouts)}
    sec.finish()
    return Timeouts(**values)


def _read_headers(data: Any, path: str, file: str) -> tuple[tuple[str, str], ...]:
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise ConfigError(file, path, "must be a mapping of header name to value")
    out = []
    for name, value in data.items():
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
            raise ConfigError(file, path, f"invalid header name {name!r}")
        if not isinstance(value, (str, int)) or any(c in str(value) for c in "\r\n\0"):
            raise ConfigError(file, _join(path, name), "header value must be a single-line string")
        out.append((name.lower(), str(value)))
    return tuple(out)


def read_upstream(data: Any, path: str, file: str) -> UpstreamSettings:
    """Parse an upstream mapping ``{url, headers, timeouts, tls: {verify, ca_file}}``."""
    sec = Section(data, path, file)
    url = sec.get("url", str, None)
    if not url:
        raise sec.error("url", "is required")
    if not re.match(r"^(https?|mock)://[^/\s]+", url):
        raise sec.error("url", f"must be http://, https:// or mock://NAME, not {url!r}")
    headers = _read_headers(sec.get("headers", dict, None), _join(path, "headers"), file)
    timeouts = _read_timeouts(sec.get("timeouts", dict, None), _join(path, "timeouts"), file)
    tls = Section(sec.get("tls", dict, None), _join(path, "tls"), file)
    verify = tls.get("verify", bool, True)
    ca_file = tls.get("ca_file", str, None)
    tls.finish()
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError(file, _join(path, "tls.ca_file"), f"no such file: {ca_file}")
    sec.finish()
    return UpstreamSettings(url=url, headers=headers, timeouts=timeouts, verify=verify, ca_file=ca_file)


def parse_config(raw: Any, file: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-loaded YAML document into a :class:`Config` (one reader per section)."""
    data = _interpolate(raw if raw is not None else {}, "", file, os.environ if env is None else env)
    top = Section(data, "", file)
    server = _read_server(Section(top.get("server", dict, None), "server", file))
    limits = _read_limits(Section(top.get("limits", dict, None), "limits", file))
    upstream_raw = top.get("upstream", dict, None)
    upstream = read_upstream(upstream_raw, "upstream", file) if upstream_raw is not None else None
    pool = _read_pool(Section(top.get("pool", dict, None), "pool", file))
    store = top.get("store", str, "memory", _store_url)
    mocks = _read_mocks(top.get("mock_upstreams", list, []), file)
    filters = _read_filters(top.get("filters", list, []), file)
    top.finish()
    if upstream is not None and upstream.url.startswith("mock://"):
        mock_name = upstream.url[len("mock://") :].split("/", 1)[0]
        if not any(m.name == mock_name for m in mocks):
            raise ConfigError(file, "upstream.url", f"no mock_upstreams entry named {mock_name!r}")
    return Config(
        file=file,
        server=server,
        limits=limits,
        upstream=upstream,
        pool=pool,
        store=store,
        mock_upstreams=tuple(mocks),
        filters=tuple(filters),
    )


def _ip_entries(entries: list[Any]) -> str | None:
    """Why ``entries`` is not a list of IP addresses and CIDR networks (None when it is)."""
    for index, entry in enumerate(entries):
        text = str(entry)
        try:
            if "/" in text:
                ipaddress.ip_network(text, strict=False)
            else:
                ipaddress.ip_address(text)
        except ValueError:
            return f"entry {index} ({text!r}) is not an IP address or CIDR network"
    return None


def _read_server(sec: Section) -> ServerSettings:
    server = ServerSettings(
        host=sec.get("host", str, "127.0.0.1"),
        port=sec.get("port", int, 8080, _port),
        workers=_workers(sec),
        access_log=_access_log_mode(sec),
        log_level=sec.get("log_level", str, "info", _one_of("debug", "info", "warning", "error")),
        validate_json=sec.get("validate_json", bool, True),
        admin_allow=tuple(str(a) for a in sec.get("admin_allow", list, ["127.0.0.1", "::1"], _ip_entries)),
        pid_file=sec.get("pid_file", str, None, lambda v: None if v.strip() else "must not be empty"),
        overhead_header=sec.get("overhead_header", bool, False),
        listen=sec.get("listen", str, "shared", _one_of("shared", "reuseport")),
    )
    sec.finish()
    return server


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1: what ``workers: auto`` means."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _workers(sec: Section) -> int:
    if sec.data.get("workers") == "auto":
        sec.used.add("workers")
        return min(256, cpu_count())
    value: int = sec.get(
        "workers", int, 1, lambda v: None if 1 <= v <= 256 else "must be between 1 and 256 (or auto: one per CPU)"
    )
    return value


def _read_limits(sec: Section) -> Limits:
    """Every :class:`Limits` field is a ``limits.<name>`` key of the same type, positive."""
    defaults = Limits()
    values: dict[str, Any] = {}
    for f in fields(Limits):
        kind = type(getattr(defaults, f.name))
        values[f.name] = sec.get(f.name, kind, getattr(defaults, f.name), _positive)
    sec.finish()
    return Limits(**values)


def _read_pool(sec: Section) -> PoolSettings:
    pool = PoolSettings(
        max_per_origin=sec.get("max_per_origin", int, 256, _positive),
        keepalive_expiry=sec.get("keepalive_expiry", float, 30.0, _positive),
    )
    sec.finish()
    return pool


def _store_url(value: str) -> str | None:
    if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "must be 'memory' or a redis:// URL"


def _read_mocks(items: list[Any], file: str) -> list[MockSpec]:
    mocks: list[MockSpec] = []
    for i, item in enumerate(items):
        path = f"mock_upstreams[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(file, path, "must be a mapping")
        options = dict(item)
        name = options.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(file, _join(path, "name"), "is required")
        if any(m.name == name for m in mocks):
            raise ConfigError(file, _join(path, "name"), f"duplicate mock upstream name {name!r}")
        host = options.pop("host", "127.0.0.1")
        port = options.pop("port", 0)
        if not isinstance(port, int) or _port(port):
            raise ConfigError(file, _join(path, "port"), "must be a port number (0 picks a free one)")
        from llmproxy.runtime.mock_hook import MockHookError, load_mock_hook  # the mock itself is never imported here

        try:
            load_mock_hook().validate(options)
        except (MockHookError, ValueError) as exc:
            raise ConfigError(file, path, str(exc)) from None
        mocks.append(MockSpec(name=name, host=str(host), port=port, options=options))
    return mocks


def _read_filters(items: list[Any], file: str) -> list[FilterSpec]:
    filters: list[FilterSpec] = []
    for i, item in enumerate(items):
        path = f"filters[{i}]"
        sec = Section(item, path, file)
        name = sec.get("name", str, None)
        if not name:
            raise sec.error("name", "is required (the filter's entry-point name; see `llmproxy filters`)")
        config = sec.get("config", dict, {})
        sec.finish()
        filters.append(FilterSpec(name=name, config=config, path=path))
    return filters


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping naming a key twice is an error.

    Plain YAML keeps the last of two equal keys without a word, so a
    config with two ``server:`` blocks would silently lose the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, file: str) -> Any:
    """Parse YAML ``text`` (from ``file``, for messages) safely, refusing duplicate keys.

    Raises :class:`ConfigError` naming the file, line and column on any
    syntax error or repeated mapping key.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(file, "", f"invalid YAML: {where}{getattr(exc, 'problem', None) or exc}") from None


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises :class:`ConfigError`."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror}") from None
    raw = read_yaml(text, file)
    return parse_config(raw, file, env)
