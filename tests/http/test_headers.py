"""proxy.headers.Headers: case-insensitive access and refusal of injected fields."""

from __future__ import annotations

import pytest

from llmproxy.headers import Headers


def test_case_insensitive_multi_valued() -> None:
    h = Headers([(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")])
    assert h.get("X-A") == "1" and h.get_all("x-a") == ["1", "3"]
    h.set("X-A", "9")
    assert h.get_all("x-a") == ["9"] and len(h) == 2
    h.add("x-c", "v")
    h.remove("X-B")
    assert "x-b" not in h and "X-C" in h
    assert list(h) == [("x-a", "9"), ("x-c", "v")]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-a", "ok\r\nx-injected: 1"),
        ("x-a", "bad\nvalue"),
        ("x-a", "nul\x00"),
        ("x-a", " leading-space"),
        ("bad name", "v"),
        ("x-a:", "v"),
        ("", "v"),
    ],
)
def test_injection_is_refused(name: str, value: str) -> None:
    h = Headers()
    with pytest.raises(ValueError):
        h.set(name, value)
    with pytest.raises(ValueError):
        h.add(name, value)
    assert len(h) == 0
