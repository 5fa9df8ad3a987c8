"""Shared fixtures: the anyio backends every backend-neutral test runs on."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each ``@pytest.mark.anyio`` test on asyncio and on trio."""
    backend: str = request.param
    return backend
