"""A middleware of your own: refuse listed recipients before any hook runs.

Serve it with::

    $ minismtp run examples.custom_middleware:app --port 2525

A middleware is a class built as ``Middleware(app, **options)`` whose instances answer events
(``async (event) -> Reply``): it answers an event itself to refuse it, or passes it on with
``await self.app(event)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from minismtp import App, Message, Reply, Transaction
from minismtp.events import Event, Handler, Rcpt
from minismtp.types import Address

MAILBOX_UNAVAILABLE = Reply(550, "5.1.1", "Mailbox unavailable")


class DenyListedRecipients:
    """Refuse the recipients in ``denied`` (compared without case) with ``550 5.1.1``.

    Acts at **rcpt**; every other event, and every other recipient, goes on down the stack.
    """

    acts_on = (Rcpt,)  # the App sends the other events past it

    def __init__(self, app: Handler, *, denied: Iterable[str]) -> None:
        self.app = app
        self.denied = {address.lower() for address in denied}

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Rcpt) and str(event.address).lower() in self.denied:
            return MAILBOX_UNAVAILABLE
        return await self.app(event)


app = App(hostname="mx.example.com")
app.add_middleware(DenyListedRecipients, denied={"former-employee@example.com"})


@app.on_rcpt
async def only_example_com(tx: Transaction, rcpt: Address) -> Reply | None:
    # Runs after the middleware: a denied recipient never gets here.
    if rcpt.domain.lower() != "example.com":
        return Reply(550, "5.7.1", "Relay access denied")
    return None


@app.on_message
async def show(message: Message) -> None:
    print(message.id, message.mail_from, [str(rcpt) for rcpt in message.rcpt_to])
