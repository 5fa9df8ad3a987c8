"""Finishing a coroutine started by hand, in the task that awaits it."""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any

import attrs


@attrs.frozen
class Suspended:
    """A coroutine started by hand (``coroutine.send(None)``) that stopped at ``waiting_on``,
    what its innermost await waits for (a future, a trio trap). Awaiting this passes that on
    to the awaiting task's scheduler and sends or throws the outcome into the coroutine,
    until it returns its value (or yields ``park``: then ``park`` itself, the coroutine left
    where it is, for whoever parked it to start again by hand).

    Most App calls finish at once (the hooks and middleware of a typical App await nothing):
    started by hand, they cost no await at all; the others finish here, in the caller's task.
    """

    coroutine: Coroutine[Any, Any, Any]
    waiting_on: Any
    park: object = None

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, waiting_on, park = self.coroutine, self.waiting_on, self.park
        while True:
            if waiting_on is park and park is not None:
                return park
            try:
                try:
                    sent = yield waiting_on
                except BaseException as exc:  # cancellation included: passed on
                    waiting_on = coroutine.throw(exc)
                else:
                    waiting_on = coroutine.send(sent)
            except StopIteration as done:
                return done.value


__all__ = ["Suspended"]
