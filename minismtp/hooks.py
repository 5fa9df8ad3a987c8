"""The App's hooks: what each stage may call, and the registry of them (:class:`Hooks`).

A hook is a plain function or a coroutine function; it answers with a
:class:`~minismtp.types.Reply` (which ends the stage: the client gets it), or None (the next
hook, then the App's own answer). An ``on_data`` hook may also answer per recipient
(:mod:`minismtp.outcomes`). The App (:mod:`minismtp.app`) is a :class:`Hooks`: its router calls
the lists kept here.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from minismtp.events import Piece
from minismtp.message import Message
from minismtp.outcomes import RecipientReplies
from minismtp.types import Address, Reply, Session, Transaction

HookResult = Reply | Awaitable[Reply | None] | None
ConnectHook = Callable[[Session], HookResult]
HeloHook = Callable[[Session, str], HookResult]
MailHook = Callable[[Transaction, Address], HookResult]
RcptHook = Callable[[Transaction, Address], HookResult]
DataChunkHook = Callable[[Transaction, Piece], HookResult]
DataHookResult = Reply | RecipientReplies | Awaitable[Reply | RecipientReplies | None] | None
DataHook = Callable[[Transaction, Message], DataHookResult]
MessageHook = Callable[[Message], Awaitable[None] | None]
LifespanHook = Callable[[], Awaitable[None] | None]

ConnectHookT = TypeVar("ConnectHookT", bound=ConnectHook)
HeloHookT = TypeVar("HeloHookT", bound=HeloHook)
MailHookT = TypeVar("MailHookT", bound=MailHook)
RcptHookT = TypeVar("RcptHookT", bound=RcptHook)
DataChunkHookT = TypeVar("DataChunkHookT", bound=DataChunkHook)
DataHookT = TypeVar("DataHookT", bound=DataHook)
MessageHookT = TypeVar("MessageHookT", bound=MessageHook)
LifespanHookT = TypeVar("LifespanHookT", bound=LifespanHook)


async def resolve(result: Reply | Awaitable[Reply | None] | None) -> Reply | None:
    """The Reply (or None) a sync or async hook gave."""
    if isinstance(result, Reply):
        return result
    if inspect.isawaitable(result):
        result = await result
    if result is None or isinstance(result, Reply):
        return result
    raise TypeError(f"a hook must return None or a Reply, not {result!r}")


async def resolve_data(result: DataHookResult) -> Reply | RecipientReplies | None:
    """What an ``on_data`` hook gave: a Reply, a mapping of recipients to Replies, or None."""
    if isinstance(result, Reply):
        return result
    if inspect.isawaitable(result):
        result = await result
    if result is None or isinstance(result, Reply | Mapping):
        return result
    raise TypeError(
        f"an on_data hook must return None, a Reply or {{recipient: Reply}}, not {result!r}"
    )


async def call_each(hooks: Iterable[Callable[..., Awaitable[None] | None]], *args: Any) -> None:
    """``hook(*args)`` for each of ``hooks`` in order, awaited if it is a coroutine; the
    first exception is raised and the hooks after it are not called."""
    for hook in hooks:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result


class Hooks:
    """The hooks registered on an App, stage by stage, in the order they are called."""

    def __init__(self) -> None:
        self._connect_hooks: list[ConnectHook] = []
        self._helo_hooks: list[HeloHook] = []
        self._mail_hooks: list[MailHook] = []
        self._rcpt_hooks: list[RcptHook] = []
        self._data_chunk_hooks: list[DataChunkHook] = []
        self._data_hooks: list[DataHook] = []
        self._message_hooks: list[MessageHook] = []
        self._disconnect_hooks: list[ConnectHook] = []
        self._startup_hooks: list[LifespanHook] = []
        self._shutdown_hooks: list[LifespanHook] = []

    @property
    def message_hooks(self) -> tuple[MessageHook, ...]:
        """The ``on_message`` hooks, in the order they are called (``minismtp consume`` calls
        them for each message it reads from a Redis stream)."""
        return tuple(self._message_hooks)

    def on_connect(self, hook: ConnectHookT) -> ConnectHookT:
        """``hook(session)`` for each new connection; a Reply refuses it (e.g. 554)."""
        self._connect_hooks.append(hook)
        return hook

    def on_helo(self, hook: HeloHookT) -> HeloHookT:
        """``hook(session, name)`` for HELO and EHLO (``session.esmtp`` is not yet updated)."""
        self._helo_hooks.append(hook)
        return hook

    def on_mail(self, hook: MailHookT) -> MailHookT:
        """``hook(transaction, sender)`` for MAIL FROM."""
        self._mail_hooks.append(hook)
        return hook

    def on_rcpt(self, hook: RcptHookT) -> RcptHookT:
        """``hook(transaction, recipient)`` for each RCPT TO."""
        self._rcpt_hooks.append(hook)
        return hook

    def on_data_chunk(self, hook: DataChunkHookT) -> DataChunkHookT:
        """``hook(transaction, chunk)`` for each piece of content as it streams in.

        ``chunk`` is bytes or a memoryview of at most 256 KiB (dot-unstuffed, CRLF line
        ends). A Reply other than 2xx refuses the message: the rest of the content is read
        and dropped, and the client gets that reply at the end of the data.
        """
        self._data_chunk_hooks.append(hook)
        return hook

    def on_data(self, hook: DataHookT) -> DataHookT:
        """``hook(transaction, message)`` with the whole message, before it is accepted.

        ``message`` is the :class:`~minismtp.message.Message` in its spool: ``headers``,
        ``open()``, ``chunks()``, ``data`` (which loads it). A Reply answers instead of the
        hand-over: a refusal, or a 2xx to accept and discard.

        A mapping ``{recipient: Reply}`` (keys: the Address objects of ``transaction.rcpt_to``)
        answers those recipients alone; the others go on to the next hook and the hand-over.
        LMTP gives each recipient its reply; SMTP folds them (see :mod:`minismtp.outcomes`).
        """
        self._data_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: ConnectHookT) -> ConnectHookT:
        """``hook(session)`` once for each connection that got ``on_connect``, when it ends
        (see :class:`~minismtp.events.Disconnect`); what it returns is ignored."""
        self._disconnect_hooks.append(hook)
        return hook

    def on_message(self, hook: MessageHookT) -> MessageHookT:
        """``hook(message)`` for each accepted message, read from the channel while serving.

        One consumer task calls the ``on_message`` hooks in order, message after message; an
        exception is logged and the next message goes on.
        """
        self._message_hooks.append(hook)
        return hook

    def on_startup(self, hook: LifespanHookT) -> LifespanHookT:
        self._startup_hooks.append(hook)
        return hook

    def on_shutdown(self, hook: LifespanHookT) -> LifespanHookT:
        self._shutdown_hooks.append(hook)
        return hook
