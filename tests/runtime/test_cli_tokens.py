"""``llmproxy tokens``: counts text and chat requests offline (CliRunner, and one real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from llmproxy.runtime.cli import main

from ..filters.test_metering_tokenizer import COOKBOOK_MESSAGES

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, stdin: str | bytes | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["tokens", *args], input=stdin)
    return result.exit_code, result.output


def test_text_from_stdin() -> None:
    assert _run("-m", "gpt-4", stdin="tiktoken is great!") == (0, "6 tokens (cl100k_base; text, gpt-4)\n")
    assert _run("-m", "gpt-4o", "-", stdin="hello world") == (0, "2 tokens (o200k_base; text, gpt-4o)\n")


def test_chat_request_file_json_output(tmp_path: Path) -> None:
    path = tmp_path / "req.json"
    path.write_bytes(orjson.dumps({"model": "gpt-4-0613", "messages": COOKBOOK_MESSAGES}))
    code, out = _run("--json", str(path))
    assert code == 0
    assert json.loads(out) == {
        "model": "gpt-4-0613",
        "kind": "openai",
        "tokens": 129,
        "encoding": "cl100k_base",
        "approximate": False,
    }
    code, out = _run("-m", "gpt-4o", str(path))  # -m overrides the body's model
    assert (code, out) == (0, "124 tokens (o200k_base; openai, gpt-4o)\n")


def test_anthropic_is_detected_and_marked_approximate() -> None:
    body = {"model": "claude-sonnet-4-5", "system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}
    code, out = _run("--json", stdin=json.dumps(body))
    record = json.loads(out)
    assert code == 0 and record["kind"] == "anthropic" and record["approximate"] is True
    code, out = _run("--protocol", "openai", "--json", stdin=json.dumps(body))
    assert json.loads(out)["kind"] == "openai"
    code, out = _run("-m", "claude-3-haiku", stdin="hello world")
    assert (code, out) == (0, "2 tokens (cl100k_base, approximate; text, claude-3-haiku)\n")


def test_responses_input_and_text_flag() -> None:
    body = json.dumps({"model": "gpt-4o", "input": "hello world"})
    assert _run("--json", stdin=body)[1].startswith('{"model":"gpt-4o","kind":"responses","tokens":9,')
    code, out = _run("--text", "-m", "gpt-4o", stdin=body)
    assert code == 0 and out.endswith("(o200k_base; text, gpt-4o)\n")
    assert int(out.split()[0]) > 9


def test_json_that_is_not_a_request_is_text() -> None:
    code, out = _run("-m", "gpt-4o", stdin='{"a": 1}')
    assert code == 0 and "; text," in out


def test_model_is_required_without_one_in_the_body() -> None:
    code, out = _run(stdin="hello")
    assert code == 2 and "-m MODEL" in out


def test_subprocess_offline(tmp_path: Path) -> None:
    """A real ``python -m llmproxy tokens`` with every socket connect refused and an empty tiktoken cache."""
    (tmp_path / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*a, **k):\n"
        "    raise OSError('network blocked by the test')\n"
        "socket.socket.connect = _refuse\n"
        "socket.getaddrinfo = _refuse\n"
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TIKTOKEN_CACHE_DIR": str(cache)}
    request = json.dumps({"model": "gpt-4-0613", "messages": COOKBOOK_MESSAGES})
    for model, expected in (("gpt-4-0613", "129 tokens (cl100k_base; openai, gpt-4-0613)"), ("gpt-4o", "124 tokens")):
        done = subprocess.run(
            [sys.executable, "-m", "llmproxy", "tokens", "-m", model, "-"],
            input=request,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(expected)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag: str) -> None:
    code, out = _run(flag)
    assert code == 0 and "offline" in out
