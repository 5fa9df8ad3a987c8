"""The server's tests run on asyncio, uvloop and trio; on asyncio and uvloop twice: with the
inline fast path (:mod:`minismtp.inline`) and without it (every App call in the connection's
task)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.backends import with_uvloop


@pytest.fixture(params=with_uvloop(), scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """asyncio and uvloop take the server's Protocol path, trio its own socket wire."""
    return request.param


@pytest.fixture(autouse=True, params=["inline", "task"])
def app_calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the server runs App calls: ``ServerConfig.inline`` follows ``MINISMTP_INLINE``."""
    monkeypatch.setenv("MINISMTP_INLINE", "1" if request.param == "inline" else "0")
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Only asyncio and uvloop have the fast path: elsewhere the second run would be the first.
    selected, deselected = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend = params.get("anyio_backend")
        name = backend[0] if isinstance(backend, tuple) else backend
        if params.get("app_calls") == "task" and name != "asyncio":
            deselected.append(item)
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
