"""Per-recipient outcomes after the data: what ``on_data`` hooks and stores may answer.

Instead of one Reply for the message, an ``on_data`` hook or a store's ``put`` may return a
mapping from recipients (the :class:`~minismtp.types.Address` objects of ``tx.rcpt_to``) to
their Reply; the recipients it leaves out get the message's own outcome (stored, ``250``).
The App records each mapping in ``transaction.recipient_replies``; the engine then answers
(:mod:`minismtp.protocol`):

- in LMTP (RFC 2033 4.2), one reply per accepted RCPT, each recipient its own;
- in SMTP, one reply for all (:func:`fold_replies`): every recipient
  accepted, ``250``; every one refused, the refusal (and nothing is stored); some of each,
  ``250``: the message is stored for the others, and the refusals stay on the Message
  (``message.recipient_replies``) for whoever must tell the sender (RFC 5321 3.6.3: a bounce).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from minismtp.types import Address, Reply, Transaction

#: What an ``on_data`` hook or a store may answer per recipient.
RecipientReplies = Mapping[Address, Reply]


def record_recipient_replies(
    transaction: Transaction, replies: Mapping[Address, Reply], source: object
) -> None:
    """Check ``replies`` (from ``source``, named in the error) and record them on the
    transaction. A key that is not a recipient, or a value that is not a Reply, is a bug of
    the hook or store: it raises, and the App answers the message ``451 4.3.0``."""
    recipients = transaction.rcpt_to
    for address, reply in replies.items():
        if not isinstance(reply, Reply):
            raise TypeError(f"{source!r}: the answer for {address} must be a Reply: {reply!r}")
        if address not in recipients:
            raise ValueError(f"{source!r}: {address!r} is not a recipient of this transaction")
    transaction.recipient_replies.update(replies)


def refused(transaction: Transaction) -> dict[Address, Reply]:
    """The recipients refused so far, with their replies."""
    return {a: r for a, r in transaction.recipient_replies.items() if not 200 <= r.code < 300}


def still_accepted(transaction: Transaction) -> list[Address]:
    """The recipients no outcome has refused yet, in RCPT order."""
    outcomes = transaction.recipient_replies
    if not outcomes:
        return list(transaction.rcpt_to)
    return [a for a in transaction.rcpt_to if (r := outcomes.get(a)) is None or 200 <= r.code < 300]


def fold_replies(reply: Reply, outcomes: Iterable[Reply]) -> Reply:
    """The one SMTP reply for a message whose recipients had ``outcomes`` (``reply``: the
    App's own answer, used when it fits).

    All accepted: ``reply`` (or the first success). Some accepted, some refused: a success,
    since the message was taken for the others: the refusals are the receiver's to report
    (RFC 5321 3.6.3 lets it accept and send a bounce later). None accepted: the refusal, a
    transient one first, so that a sender retries rather than gives up on recipients that
    may yet be delivered.
    """
    accepted: Reply | None = None
    transient: Reply | None = None
    permanent: Reply | None = None
    for outcome in outcomes:
        if 200 <= outcome.code < 300:
            accepted = accepted or outcome
        elif outcome.code < 500:
            transient = transient or outcome
        else:
            permanent = permanent or outcome
    if accepted is not None:
        return reply if 200 <= reply.code < 300 else accepted
    return transient or permanent or reply
