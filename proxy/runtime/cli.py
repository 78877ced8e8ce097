"""The ``llmproxy`` command line."""

from __future__ import annotations

import sys
from typing import BinaryIO

import click
import uvloop

from llmproxy import __version__
from llmproxy.runtime.config import ConfigError, load_config

__all__ = ["main"]

_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str, json: bool = False) -> None:
    from llmproxy.runtime.logs import setup

    setup(level, json=json)


class _WorkersType(click.ParamType):  # type: ignore[type-arg]
    """A worker count (1-256) or ``auto`` (one per CPU)."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text == "auto":
            from llmproxy.runtime.config import cpu_count

            return min(256, cpu_count())
        if text.isdigit() and 1 <= int(text) <= 256:
            return int(text)
        self.fail(f"{value!r} is not a number from 1 to 256 or auto", param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmproxy")
def main() -> None:
    """llmproxy: a fast LLM gateway for the OpenAI and Anthropic APIs."""


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--host", default=None, help="Address to listen on (overrides server.host).")
@click.option(
    "--port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Port to listen on (overrides server.port; 0 picks one).",
)
@click.option(
    "--workers",
    default=None,
    type=_WorkersType(),
    help="Worker processes, or auto for one per CPU (overrides server.workers).",
)
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(_LEVELS),
    help="Log level (overrides server.log_level; debug: each filter decision).",
)
@click.option(
    "--pid-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the pid here while serving, for `llmproxy reload` (overrides server.pid_file).",
)
def serve(
    config_path: str,
    host: str | None,
    port: int | None,
    workers: int | None,
    log_level: str | None,
    pid_file: str | None,
) -> None:
    """Run the proxy with the config in FILE until SIGTERM or SIGINT.

    SIGTERM/SIGINT drain in-flight exchanges for limits.shutdown_grace seconds, then end the rest
    with an error; SIGHUP (or `llmproxy reload`) re-reads the config and swaps it in without
    dropping a request (an invalid config is logged and changes nothing).
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if workers is not None:
        from dataclasses import replace

        config = replace(config, server=replace(config.server, workers=workers))
    _setup_logging(log_level or config.server.log_level, json=config.server.access_log == "json")
    from llmproxy.runtime.supervisor import run

    sys.exit(run(config, host, port, pid_file))


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="YAML config file (for its server.pid_file).",
)
@click.option("--pid-file", default=None, type=click.Path(dir_okay=False), help="The pid file `serve` writes.")
def reload(config_path: str | None, pid_file: str | None) -> None:
    """Make a running `llmproxy serve` re-read its config (SIGHUP to the pid in its pid file).

    The running instance checks the new config first: an invalid one is logged there and changes nothing.
    """
    import os
    import signal

    from llmproxy.runtime.supervisor import read_pid_file

    if pid_file is None:
        if config_path is None:
            raise click.UsageError("give --pid-file, or -c with a config that sets server.pid_file")
        try:
            pid_file = load_config(config_path).server.pid_file
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if pid_file is None:
            raise click.ClickException(f"{config_path}: server.pid_file is not set (or give --pid-file)")
    try:
        pid = read_pid_file(pid_file)
        os.kill(pid, signal.SIGHUP)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot signal process {pid}: {exc.strerror}") from None
    click.echo(f"sent SIGHUP to llmproxy (pid {pid}); its log says whether the new config was taken")


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option(
    "--print",
    "print_config",
    is_flag=True,
    help="Print the effective config (defaults filled in, ${VAR}s resolved, secrets masked) as YAML.",
)
def check(config_path: str, print_config: bool) -> None:
    """Validate a config file (and its filters' sections); exit 1 on error."""
    from llmproxy.runtime.app import check_config

    try:
        config = load_config(config_path)
        names = uvloop.run(check_config(config))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if print_config:
        from llmproxy.runtime.effective import effective_yaml

        click.echo(effective_yaml(config), nl=False)
        return
    click.echo(f"{config_path}: ok ({len(names)} filter{'s' if len(names) != 1 else ''}: {', '.join(names) or 'none'})")


@main.command("filters")
def list_filters() -> None:
    """List installed filters (entry-point group llmproxy.filters) and where they come from."""
    from llmproxy.runtime.plugins import installed_filters

    found = installed_filters()
    if not found:
        click.echo("no filters installed")
        return
    width = max(len(name) for name in found)
    for name, ep in sorted(found.items()):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "?"
        click.echo(f"{name.ljust(width)}  {ep.value}  ({dist})")


@main.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9009, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--tokens", default=16, show_default=True, type=click.IntRange(1), help="Content tokens per reply.")
@click.option("--ttft-ms", default=0.0, show_default=True, type=float, help="Delay before the first token.")
@click.option("--itl-ms", default=0.0, show_default=True, type=float, help="Delay between stream events.")
@click.option(
    "--provider-headers",
    is_flag=True,
    help="Send the ~20 informational header fields a hosted provider sends (rate limits, request id, CDN).",
)
def mock_upstream(host: str, port: int, tokens: int, ttft_ms: float, itl_ms: float, provider_headers: bool) -> None:
    """Serve a fake OpenAI + Anthropic provider (offline; for quickstart, tests and bench).

    Faults are chosen per request with headers: x-mock-status (+ x-mock-retry-after),
    x-mock-fault (reset | stall | drop | malformed), x-mock-tokens, x-mock-ttft-ms,
    x-mock-itl-ms, x-mock-tool-calls. GET /_mock/requests lists what it received.
    """
    from llmproxy.runtime.mock_hook import MockHookError, load_mock_hook  # never the mock itself: see proxy.mock_hook

    options = {"tokens": tokens, "ttft": ttft_ms / 1000, "itl": itl_ms / 1000, "provider_headers": provider_headers}
    try:
        hook = load_mock_hook()
        hook.validate(options)
    except (MockHookError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _setup_logging("info")
    click.echo(f"mock upstream on http://{host}:{port}", err=True)
    hook.serve(host, port, options)


@main.command("tokens")
@click.option("-m", "--model", default=None, help="Model whose tokenizer counts (default: the body's model).")
@click.option(
    "--protocol",
    type=click.Choice(("auto", "openai", "anthropic", "responses")),
    default="auto",
    show_default=True,
    help="Protocol of a JSON request body; auto: responses if it has input, anthropic if it has "
    "system or Anthropic content blocks, else openai chat.",
)
@click.option("--text", "as_text", is_flag=True, help="Count the input as plain text even if it is JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a line.")
@click.argument("source", type=click.File("rb"), default="-")
def tokens(model: str | None, protocol: str, as_text: bool, as_json: bool, source: BinaryIO) -> None:
    """Count the tokens of SOURCE (a file, or - for stdin), offline.

    A JSON object with messages or input is counted as a chat request (the prompt tokens a provider
    would bill: message framing, tools, images); anything else as plain text. Prints the count,
    the encoding, and whether it is approximate (models without a public tokenizer).
    """
    import orjson

    from llmproxy.filters.metering.encodings import EncodingUnavailable
    from llmproxy.filters.metering.tokenizer import count_prompt, count_text, detect_protocol

    data = source.read()
    body: object = None
    if not as_text and data.lstrip()[:1] == b"{":
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            body = None
    is_request = isinstance(body, dict) and ("messages" in body or "input" in body)
    if model is None:
        model = body.get("model") if isinstance(body, dict) and is_request else None
        if not isinstance(model, str) or not model:
            raise click.UsageError("give -m MODEL (the input names no model)")
    try:
        if is_request:
            assert isinstance(body, dict)
            used = detect_protocol(body) if protocol == "auto" else protocol
            counted = count_prompt(body, used, model)
        else:
            used = "text"
            counted = count_text(data.decode("utf-8", errors="replace"), model)
    except EncodingUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        record = {"model": model, "kind": used, **counted._asdict()}
        click.echo(orjson.dumps(record).decode())
    else:
        note = ", approximate" if counted.approximate else ""
        click.echo(f"{counted.tokens} tokens ({counted.encoding}{note}; {used}, {model})")


@main.group("keys")
def keys() -> None:
    """Virtual keys for the auth filter: hash a key for the config, or make a new one."""


@keys.command("hash")
@click.argument("key", required=False, default="-", metavar="[KEY|-]")
def keys_hash(key: str) -> None:
    """Print the key_hash (sha256:<hex>) and key_id of KEY, for an auth filter entry.

    Without KEY, or with -, the key is read from stdin (one line; a hidden prompt on a terminal),
    which keeps it out of the shell history. The key itself is never printed.
    """
    from llmproxy.filters.auth import hash_key, key_id

    if key == "-":
        if sys.stdin.isatty():
            key = click.prompt("key", hide_input=True, err=True)
        else:
            key = sys.stdin.readline().rstrip("\r\n")
    key = key.strip()
    if not key:
        raise click.UsageError("the key is empty")
    digest = hash_key(key)
    click.echo(f'key_hash: "{digest}"')
    click.echo(f"key_id: {key_id(digest)}")


@keys.command("new")
def keys_new() -> None:
    """Print a fresh random key (sk-..., 256 bits) with its key_hash and key_id.

    Give the key to its user; put only key_hash in the config.
    """
    from llmproxy.filters.auth import hash_key, key_id, new_key

    key = new_key()
    digest = hash_key(key)
    click.echo(f"key: {key}")
    click.echo(f'key_hash: "{digest}"')
    click.echo(f"key_id: {key_id(digest)}")
