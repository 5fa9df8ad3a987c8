"""The middleware stack's parts: how a middleware is declared, kept and chained by event.

:class:`~minismtp.app.App` builds its stack from these once, at the first event.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Generic, ParamSpec, Protocol

import attrs

from minismtp.events import Event, Handler
from minismtp.types import Reply

P = ParamSpec("P")


class MiddlewareFactory(Protocol[P]):
    """A middleware class: ``Middleware(app, **options)`` gives a handler wrapping ``app``.

    The class may say which events it acts on, as a class attribute: ``acts_on = (Rcpt,)``.
    It then passes every other event to ``app`` unchanged, and the App sends those past it.
    """

    def __call__(self, app: Handler, /, *args: P.args, **kwargs: P.kwargs) -> Handler: ...


@attrs.frozen
class Middleware(Generic[P]):
    factory: MiddlewareFactory[P]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    acts_on: tuple[type[Event], ...] | None  # None: every event


def acts_on(middleware: object) -> tuple[type[Event], ...] | None:
    declared = getattr(middleware, "acts_on", None)
    if declared is None:
        return None
    if not (
        isinstance(declared, tuple)
        and declared
        and all(isinstance(kind, type) and issubclass(kind, Event) for kind in declared)
    ):
        raise TypeError(f"{middleware!r}: acts_on must be a tuple of event classes")
    return declared


def next_for_each_event(handlers: dict[type[Event], Handler], default: Handler) -> Handler:
    """What a middleware awaits as its ``app`` when the handlers below it differ by event."""
    handler_for = handlers.get

    def next_handler(event: Event) -> Awaitable[Reply]:
        return handler_for(type(event), default)(event)

    return next_handler


__all__ = ["Middleware", "MiddlewareFactory", "acts_on", "next_for_each_event"]
