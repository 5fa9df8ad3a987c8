"""The values minismtp passes around: replies, addresses, sessions, transactions, messages."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from minismtp.message import Message as Message

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _check_code(_: Any, __: Any, code: int) -> None:
    if not 200 <= code <= 599:
        raise ValueError(f"SMTP reply code out of range: {code}")


# Replies are made per command (the App's "queued as <id>" per message): the few statuses in
# use are checked once, then found in this set.
_valid_statuses: set[str] = set()


def _check_status(_: Any, __: Any, status: str | None) -> None:
    if status is None or status in _valid_statuses:
        return
    if not _STATUS.fullmatch(status):
        raise ValueError(f"not an enhanced status code (RFC 3463): {status!r}")
    if len(_valid_statuses) < 1024:
        _valid_statuses.add(status)


def _check_text(_: Any, __: Any, text: str | tuple[str, ...]) -> None:
    lines = (text,) if isinstance(text, str) else text
    if not lines:
        raise ValueError("a reply needs at least one line")
    for line in lines:
        # A CR or LF in reply text would let a hook inject a second reply on the wire.
        if "\r" in line or "\n" in line:
            raise ValueError(f"reply text may not contain CR or LF: {line!r}")


def _to_text(text: str | list[str] | tuple[str, ...]) -> str | tuple[str, ...]:
    return text if isinstance(text, str) else tuple(text)


@attrs.frozen
class Reply:
    """An SMTP reply: ``Reply(550, "5.7.1", "Relay access denied")``.

    ``text`` is one line, or a sequence of lines for a multi-line reply. ``status`` is the
    enhanced status code of RFC 3463; it is left out for the greeting and the EHLO reply.
    """

    code: int = attrs.field(validator=_check_code)
    status: str | None = attrs.field(default=None, validator=_check_status)
    text: str | tuple[str, ...] = attrs.field(default="", converter=_to_text, validator=_check_text)
    _wire: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_extension(self, keyword: str, *params: str) -> Reply:
        """This EHLO reply advertising ``keyword`` (replacing an earlier line of that keyword)."""
        head, *rest = self.lines
        keep = [line for line in rest if line.split(" ", 1)[0].upper() != keyword.upper()]
        return attrs.evolve(self, text=(head, *keep, " ".join((keyword, *params))))

    def without_extension(self, keyword: str) -> Reply:
        """This EHLO reply with ``keyword`` no longer advertised."""
        head, *rest = self.lines
        keep = [line for line in rest if line.split(" ", 1)[0].upper() != keyword.upper()]
        return attrs.evolve(self, text=(head, *keep))

    def __bytes__(self) -> bytes:
        wire = self._wire
        if wire is None:
            prefix = f"{self.status} " if self.status else ""
            text = self.text
            if isinstance(text, str):  # most replies: one line
                wire = f"{self.code} {prefix}{text}\r\n".encode()
            else:
                last = len(text) - 1
                wire = "".join(
                    f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
                    for i, line in enumerate(text)
                ).encode()
            # Replies are mostly constants answered again and again: encode each once.
            object.__setattr__(self, "_wire", wire)
        return wire

    def __str__(self) -> str:
        return bytes(self).decode("utf-8").rstrip("\r\n")


def queued_reply(message_id: str) -> Reply:
    """``250 2.0.0 OK queued as <message_id>``, the one reply made anew for every message.

    Built field by field: the validators would only confirm what holds for every id we make
    (hex digits). Once per message, that saves about a third of a microsecond.
    """
    reply: Reply = object.__new__(Reply)
    set_field = object.__setattr__
    set_field(reply, "code", 250)
    set_field(reply, "status", "2.0.0")
    set_field(reply, "text", f"OK queued as {message_id}")
    set_field(reply, "_wire", None)  # made by __bytes__, as for any reply
    return reply


@attrs.frozen
class Address:
    """A mailbox from a MAIL or RCPT path.

    ``local_part`` as the client wrote it (a quoted string keeps its quotes), ``domain`` as
    written (an address literal keeps its brackets). The null reverse-path ``<>`` has both
    empty; ``<postmaster>`` has an empty domain.
    """

    local_part: str
    domain: str
    raw: str = attrs.field(default="", eq=False)
    _text: str | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def null(cls) -> Address:
        return cls("", "", "<>")

    @property
    def is_null(self) -> bool:
        return not self.local_part and not self.domain

    def __str__(self) -> str:
        text = self._text
        if text is None:
            # Kept: the parser hands out the same Address for the same path again and again,
            # and each message writes its addresses in the log line and the trace header.
            text = f"{self.local_part}@{self.domain}" if self.domain else self.local_part
            object.__setattr__(self, "_text", text)
        return text


@attrs.frozen
class TLSInfo:
    """What the TLS layer negotiated, recorded on the session."""

    version: str
    cipher: str
    peer_certificate_subject: str | None = None


@attrs.define(eq=False)
class Session:
    """One client connection. Mutable: the engine and the server update it as the dialogue goes.

    ``extras`` is free for middleware and hooks to keep per-connection state in.
    """

    id: str = ""
    hostname: str = "localhost"
    peer: tuple[str, int] = ("", 0)
    local: tuple[str, int] = ("", 0)
    helo_name: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    transactions: int = 0
    extras: dict[str, Any] = attrs.field(factory=dict)
    #: Seconds the server holds the greeting back after the App accepted the connection; a
    #: client that talks meanwhile is refused (``554 5.5.1``, RFC 5321 4.3.1: the client
    #: waits for the greeting). Set at Connect (``contrib.early_talker.EarlyTalker``).
    greeting_delay: float = 0.0
    lmtp: bool = False  # an LMTP session (RFC 2033): set by the engine

    @property
    def peer_host(self) -> str:
        return self.peer[0]

    @property
    def protocol(self) -> str:
        """The ``with`` word of a ``Received:`` header (RFC 3848)."""
        if self.lmtp:
            return "LMTPS" if self.tls else "LMTP"
        if not self.esmtp:
            return "SMTP"
        return "ESMTPS" if self.tls else "ESMTP"


@attrs.define(eq=False)
class Transaction:
    """One mail transaction, from MAIL to the end of DATA/BDAT (or RSET).

    ``max_size`` starts at the server's limit; middleware may lower it during MAIL or RCPT and
    the engine enforces it while the message streams in.
    """

    session: Session
    mail_from: Address
    mail_params: dict[str, str | None] = attrs.field(factory=dict)
    rcpt_to: list[Address] = attrs.field(factory=list)
    rcpt_params: list[dict[str, str | None]] = attrs.field(factory=list)
    max_size: int = 32 * 1024 * 1024
    extras: dict[str, Any] = attrs.field(factory=dict)
    size: int = 0  # octets of content, once it is complete
    reply_code: int | None = None  # the reply that ended it; None while open, or if abandoned
    message_id: str | None = None  # the id of the message the App accepted from it
    #: The message under construction, from the content's first chunk on (the App makes it);
    #: once the App handed it over, that message. The engine closes and forgets it when the
    #: transaction ends without a hand-over.
    message: Message | None = attrs.field(default=None, repr=False)
    # For the log line: the recipients refused (with the reply each got), and the status and
    # text of a refusal of the content.
    refused_rcpts: list[tuple[Address, Reply]] | None = None
    refusal: str | None = None
    #: The recipients whose outcome differs from the reply to the message: a refusal after
    #: the data (no such mailbox, mailbox full), by the ``Address`` objects of ``rcpt_to``.
    #: LMTP sends each its own reply; SMTP folds them into one
    #: (:func:`minismtp.protocol.fold_replies`).
    recipient_replies: dict[Address, Reply] = attrs.field(factory=dict)

    @property
    def declared_size(self) -> int | None:
        size = self.mail_params.get("SIZE")
        return int(size) if size is not None else None

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.mail_params

    @property
    def body_type(self) -> str:
        return (self.mail_params.get("BODY") or "7BIT").upper()


def __getattr__(name: str) -> Any:
    # Message lives in minismtp.message (it needs the spool); it was defined here first.
    if name == "Message":
        from minismtp.message import Message

        return Message
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
