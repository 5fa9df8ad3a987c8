"""A clock that moves only when a test moves it, for middleware that takes ``clock=``."""

from __future__ import annotations

import attrs


@attrs.define
class FakeClock:
    """``clock()`` is ``clock.now``; a test advances it with ``clock.now += seconds``."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now
