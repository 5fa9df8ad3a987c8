"""The middleware stack's parts: how a middleware is declared, kept and chained by event.

:class:`~minismtp.app.App` builds its stack from these once, at the first event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
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


def build_stacks(
    middleware: Sequence[Middleware[Any]],
    routes: Mapping[type[Event], Handler],
    route: Handler,
) -> tuple[dict[type[Event], Handler], Handler]:
    """Build the middleware once, innermost first, over ``routes`` (the handler of each event
    class) and ``route`` (of any class); give, per event class, the handler an event of that
    class goes to first, and the handler of any other class. A middleware that declares
    ``acts_on`` is on the way of those events only: at the other stages it costs nothing."""
    stacks: dict[type[Event], Handler] = dict(routes)
    stack = route  # for events of any other class: every middleware
    for layer in middleware:
        if all(handler is stack for handler in stacks.values()):
            app = stack
        else:
            app = next_for_each_event(dict(stacks), stack)
        handler = layer.factory(app, *layer.args, **layer.kwargs)
        for kind in stacks:
            if layer.acts_on is None or issubclass(kind, layer.acts_on):
                stacks[kind] = handler
        stack = handler
    return stacks, stack


__all__ = ["Middleware", "MiddlewareFactory", "acts_on", "build_stacks", "next_for_each_event"]
