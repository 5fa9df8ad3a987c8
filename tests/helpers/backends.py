"""The anyio backends a module runs its tests on."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest


def with_uvloop() -> list[Any]:
    """asyncio, trio and (when installed) uvloop: for a module's own ``anyio_backend``.

    uvloop is what ``minismtp run --loop auto`` picks, and the server's asyncio Protocol
    path meets uvloop's own transports there, so the server's tests run on it too.
    """
    backends: list[Any] = ["asyncio", "trio"]
    if importlib.util.find_spec("uvloop") is not None and sys.platform != "win32":
        backends.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))
    return backends
