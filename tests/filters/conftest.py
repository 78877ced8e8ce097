"""Fixtures shared by the filter tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .scripted_provider import Scripted


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()
