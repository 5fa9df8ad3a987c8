"""The App's terminal hand-off: an accepted message goes to the store, or on the channel,
before the ``250``; with per-recipient outcomes (:mod:`minismtp.outcomes`), for the recipients
no outcome refused, and not at all when every one was refused.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from minismtp.events import Data
from minismtp.message import Message
from minismtp.outcomes import fold_replies, record_recipient_replies, still_accepted
from minismtp.replies import LOCAL_ERROR
from minismtp.stores import StoreUnavailable
from minismtp.types import Reply, Transaction, queued_reply

if TYPE_CHECKING:
    from minismtp.app import App
    from minismtp.hooks import MessageHook

# The App's log lines, under the App's name, wherever in it they are written.
logger = logging.getLogger("minismtp.app")


async def hand_over(app: App, event: Data, message: Message) -> Reply:
    """The terminal hand-over of an accepted message: to the App's store (then to its
    ``on_message`` consumers too), or on its channel; for the recipients no outcome refused.
    The ``250 ... queued as <id>`` once it is done, or why not."""
    transaction = event.transaction
    if transaction.recipient_replies and not for_the_others(transaction, message):
        return every_recipient_refused(transaction)
    store = app.store
    try:
        if store is None:
            app._send.send_nowait(message)  # the usual hand-over: no coroutine for it
        else:
            answers = await store.put(message)
            if answers:
                record_recipient_replies(transaction, answers, store)
                if not for_the_others(transaction, message):
                    return every_recipient_refused(transaction)
            _notify(app, message)
    except StoreUnavailable as exc:
        logger.debug("message %s not stored: %s; answered 451", message.id, exc)
        return LOCAL_ERROR
    except (OSError, anyio.ClosedResourceError, anyio.BrokenResourceError):
        logger.exception("could not hand over message %s; answered 451", message.id)
        return LOCAL_ERROR
    transaction.message_id = message.id
    if transaction.recipient_replies and not event.session.lmtp:
        log_untold_refusals(message)
    if logger.isEnabledFor(logging.DEBUG):
        # DEBUG: the server logs one INFO line per transaction, with the reply and timing.
        logger.debug(
            "accepted %s peer=%s helo=%s from=<%s> to=%s size=%d",
            message.id,
            message.peer[0],
            message.helo_name,
            message.mail_from,
            ",".join(f"<{rcpt}>" for rcpt in message.rcpt_to),
            message.size,
        )
    return queued_reply(message.id)


def _notify(app: App, message: Message) -> None:
    """A stored message goes to the ``on_message`` consumers too, if there are any."""
    if app._message_hooks:
        try:
            app._send.send_nowait(message)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Stored already: the 250 stands; only the notification is lost.
            logger.warning("message %s stored, but on_message consumers are gone", message.id)


def for_the_others(transaction: Transaction, message: Message) -> bool:
    """Point ``message`` at the recipients no outcome has refused, and record the outcomes on
    it; False when there is nobody left to hand it over for."""
    message.recipient_replies = transaction.recipient_replies
    accepted = still_accepted(transaction)
    if len(accepted) != len(message.rcpt_to):
        params = dict(zip(transaction.rcpt_to, transaction.rcpt_params, strict=True))
        message.rcpt_to = tuple(accepted)
        message.rcpt_params = tuple(params[address] for address in accepted)
    return bool(accepted)


def every_recipient_refused(transaction: Transaction) -> Reply:
    """The reply when every recipient was refused after the data: their fold (in LMTP the
    engine sends each its own, and this one goes nowhere)."""
    outcomes = transaction.recipient_replies
    return fold_replies(LOCAL_ERROR, [outcomes[address] for address in transaction.rcpt_to])


def log_untold_refusals(message: Message) -> None:
    """SMTP has one reply per message: a recipient refused after the data, in a message taken
    for others, is not told to the sender by us. Say so, loudly (see minismtp.outcomes)."""
    refusals = {a: r for a, r in message.recipient_replies.items() if not 200 <= r.code < 300}
    if refusals:
        logger.warning(
            "message %s accepted for %s; refused after the data, which SMTP cannot tell the "
            "sender (a bounce is the receiver's to send): %s",
            message.id,
            ",".join(f"<{address}>" for address in message.rcpt_to),
            "; ".join(f"<{address}> {reply}" for address, reply in refusals.items()),
        )


async def consume(
    receive: MemoryObjectReceiveStream[Message],
    hooks: Sequence[MessageHook],
    raise_exceptions: bool,
    errors: list[Exception],
) -> None:
    """The App's consumer task while serving: each message from the channel to the
    ``on_message`` hooks in order; an exception is logged (or, with ``raise_exceptions``, kept
    in ``errors``) and the next hook and message go on."""
    while True:
        try:
            message = await receive.receive()
        except anyio.EndOfStream:
            return
        # Take everything queued on this wake-up without going back to the scheduler.
        while True:
            for hook in hooks:
                try:
                    result = hook(message)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    if raise_exceptions:
                        errors.append(exc)
                    else:
                        logger.exception("on_message hook failed for message %s", message.id)
            try:
                message = receive.receive_nowait()
            except anyio.WouldBlock:
                break
            except anyio.EndOfStream:
                return
