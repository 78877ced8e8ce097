"""Image token costs, and image dimensions read from the head of a ``data:`` URL.

OpenAI (gpt-4o, gpt-4-turbo vision; platform.openai.com "Images and vision", "Calculating costs"):
``detail: low`` costs the base tokens (85). ``high``/``auto``: scale to fit in 2048x2048, then so
the shortest side is at most 768, then ``tiles * 170 + 85`` where tiles are 512 px squares
(1024x1024 -> 765; 2048x4096 -> 1105). gpt-4o-mini uses 2833 + 5667 per tile; o1/o3 75 + 150.
When the size is not knowable (a remote URL), ``high``/``auto`` is estimated as a 1024x1024 image
(765) and marked approximate. Patch-based models (gpt-4.1-mini/nano, o4-mini) use the tile rule
too here: approximate.

Anthropic (docs.anthropic.com "Vision"): ``tokens = width * height / 750`` after scaling the long
edge to at most 1568 px; an unknown size is estimated at 1600 tokens (the cap at ~1.15 MP).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct

_TILE_COSTS: tuple[tuple[str, int, int], ...] = (
    ("gpt-4o-mini", 2833, 5667),
    ("o1", 75, 150),
    ("o3", 75, 150),
)
_DEFAULT_COST = (85, 170)
_ANTHROPIC_UNKNOWN = 1600


def _costs(model: str) -> tuple[int, int]:
    name = model.rsplit("/", 1)[-1].lower()
    for prefix, base, tile in _TILE_COSTS:
        if name.startswith(prefix) and not name.startswith("o1-mini") and not name.startswith("o3-mini"):
            return base, tile
    return _DEFAULT_COST


def openai_image_tokens(width: int | None, height: int | None, detail: str, model: str) -> tuple[int, bool]:
    """(tokens, approximate) for one image in an OpenAI request, by the tile rule above."""
    base, per_tile = _costs(model)
    if detail == "low":
        return base, False
    if not width or not height:
        return base + 4 * per_tile, True
    w, h = float(width), float(height)
    if w > 2048 or h > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return base + tiles * per_tile, False


def anthropic_image_tokens(width: int | None, height: int | None) -> tuple[int, bool]:
    """(tokens, approximate) for one image in an Anthropic request: ``w * h / 750`` after resize."""
    if not width or not height:
        return _ANTHROPIC_UNKNOWN, True
    w, h = float(width), float(height)
    if max(w, h) > 1568:
        scale = 1568 / max(w, h)
        w, h = w * scale, h * scale
    return max(1, math.ceil(w * h / 750)), True


def _size_from_bytes(head: bytes) -> tuple[int, int] | bool | None:
    """(width, height), None if not a known format, or True if more bytes are needed (JPEG)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        if len(head) < 24:
            return True
        w, h = struct.unpack(">II", head[16:24])
        return w, h
    if head[:6] in (b"GIF87a", b"GIF89a"):
        if len(head) < 10:
            return True
        w, h = struct.unpack("<HH", head[6:10])
        return w, h
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    return None


def _webp_size(head: bytes) -> tuple[int, int] | bool | None:
    if len(head) < 30:
        return True
    chunk = head[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


# JPEG start-of-frame markers (baseline, progressive, lossless, ...) — not DHT/JPG/DAC.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_size(head: bytes) -> tuple[int, int] | bool | None:
    i = 2
    n = len(head)
    while True:
        if i + 4 > n:
            return True
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if marker in _SOF:
            if i + 9 > n:
                return True
            h, w = struct.unpack(">HH", head[i + 5 : i + 9])
            return w, h
        i += 2 + length


_FIRST_CHUNK = 1024  # base64 chars (768 bytes): enough for PNG, GIF, WebP and most JPEGs
_MAX_CHUNK = 1 << 20  # JPEGs with a large EXIF/ICC block before the frame header


def data_url_size(url: str) -> tuple[int, int] | None:
    """(width, height) of a base64 ``data:`` URL image, decoding only a prefix; else None."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 0, 256)
    if comma < 0 or ";base64" not in url[:comma]:
        return None
    return base64_image_size(url[comma + 1 :])


def base64_image_size(data: str) -> tuple[int, int] | None:
    """(width, height) of base64 PNG/JPEG/GIF/WebP data, decoding a growing prefix only."""
    chunk = _FIRST_CHUNK
    while True:
        prefix = data[:chunk]
        prefix = prefix[: len(prefix) - len(prefix) % 4]
        try:
            head = base64.b64decode(prefix)
        except (binascii.Error, ValueError):
            return None
        found = _size_from_bytes(head)
        if found is not True:
            return found if isinstance(found, tuple) else None
        if chunk >= len(data) or chunk >= _MAX_CHUNK:
            return None
        chunk *= 8
