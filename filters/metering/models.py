"""Model name -> tiktoken encoding, and whether the count is exact or an approximation.

Exact (OpenAI's published tokenizers):

* ``o200k_base``: gpt-4o*, chatgpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, o1*, o3*, o4*, gpt-oss*,
  omni-moderation*, codex-mini*.
* ``cl100k_base``: gpt-4 / gpt-4-turbo / gpt-4-32k, gpt-3.5*, text-embedding-*.

Approximate (no public tokenizer, ``approximate=True``, counted with ``cl100k_base``): claude*,
gemini*, llama*, mistral*, mixtral*, qwen*, deepseek*, command*, and any name not recognised —
including Azure deployment names, which are free-form. Expect the true count to differ by
roughly 5-20 % (Claude's tokenizer gives more tokens than cl100k for the same English text).

A provider prefix (``openai/gpt-4o``, ``azure/gpt-4o-mini``, ``openrouter/openai/gpt-4o``) is
stripped; only the last path segment is matched. If ``o200k_base`` is not installed (the
``llmproxy[o200k]`` extra), o200k models fall back to ``cl100k_base`` with ``approximate=True``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from llmproxy.filters.metering.encodings import CL100K, O200K, installed

# Checked in order: the first matching prefix wins (gpt-4o before gpt-4).
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("gpt-oss", O200K),
    ("o1", O200K),
    ("o3", O200K),
    ("o4", O200K),
    ("omni-moderation", O200K),
    ("codex-mini", O200K),
    ("gpt-4", CL100K),
    ("gpt-3.5", CL100K),
    ("gpt-35", CL100K),  # Azure's spelling of gpt-3.5 model names
    ("text-embedding-", CL100K),
)


class EncodingChoice(NamedTuple):
    """Which encoding counts a model, and whether that count only approximates the provider's."""

    encoding: str
    approximate: bool


def _bare(model: str) -> str:
    return model.rsplit("/", 1)[-1].strip().lower()


@lru_cache(maxsize=1024)
def encoding_for(model: str) -> EncodingChoice:
    """The encoding for ``model`` (see the module docstring for the table); cached per name."""
    name = _bare(model)
    for prefix, encoding in _PREFIXES:
        if name.startswith(prefix):
            if encoding == O200K and not installed(O200K):
                return EncodingChoice(CL100K, True)
            return EncodingChoice(encoding, False)
    return EncodingChoice(CL100K, True)


def is_anthropic(model: str) -> bool:
    """Whether ``model`` names a Claude model (used to pick Anthropic's image rule)."""
    return _bare(model).startswith("claude")
