"""The sans-I/O SMTP and LMTP engine: bytes in, events out, replies to bytes (RFC 5321, RFC 2033
and extensions).

Like h11, the engine does no I/O. The caller feeds it what the client sent with
:meth:`Engine.receive_data`, asks :meth:`Engine.next_event` what to do next, answers the
App events (Connect, Helo, Mail, Rcpt, DataChunk, Data) with :meth:`Engine.respond`, and
writes out :meth:`Engine.data_to_send`. Everything the RFCs decide without the App -- syntax,
command sequence, limits, dot-stuffing, the end of data -- is decided by the engine: this
module holds its state and the caller's side; the command handlers are in
:mod:`minismtp.commands`, the content side (pieces out as events) in :mod:`minismtp.streaming`,
the content readers (DATA's dot reader, BDAT's chunk reader) in :mod:`minismtp.content`, the
states in :mod:`minismtp.states` and the replies it sends on its own in :mod:`minismtp.replies`.

Content streams: as a reader settles it, the engine hands it on in ``DataChunk`` events of at
most :data:`MAX_CHUNK` octets, then asks about the whole message with ``Data``. A refused
chunk refuses the content: the rest is read and dropped, and the refusal answers the end of
data. Every transaction ends in :meth:`Engine._reset_transaction`, which also closes the
message spooled for it unless the App handed it over.

In LMTP mode (RFC 2033) the client greets with LHLO, and the end of the content is answered
once per accepted RCPT, in RCPT order, each recipient with its own outcome: the App records
the outcomes that differ from its reply in ``transaction.recipient_replies``. In SMTP mode the
same record is folded into the one reply SMTP allows (:func:`fold_replies`).
"""

from __future__ import annotations

import re

import attrs

from minismtp.commands import COMMANDS, ehlo_keywords
from minismtp.content import ChunkReader, DotReader
from minismtp.events import Connect, Data, DataChunk, Event, Helo, Mail, Rcpt
from minismtp.limits import Limits
from minismtp.outcomes import fold_replies
from minismtp.replies import (
    BAD_RECIPIENT,
    BAD_SENDER,
    BARE_LINE_END_IN_COMMAND,
    BDAT_SYNTAX,
    BYE,
    DATA_AFTER_BDAT,
    DATA_GO_AHEAD,
    DUPLICATE_RECIPIENT,
    EXPN_REPLY,
    HELO_SYNTAX,
    LINE_TOO_LONG,
    LMTP_LHLO_SYNTAX,
    LMTP_NEED_LHLO,
    LMTP_NEED_RCPT,
    LMTP_NOT_SMTP,
    MAIL_SYNTAX,
    NEED_HELO,
    NEED_MAIL,
    NEED_RCPT,
    NEED_SMTPUTF8,
    NESTED_MAIL,
    NO_ARGUMENTS,
    NOT_UTF8,
    OK,
    PARAMS_NEED_EHLO,
    RCPT_SYNTAX,
    TLS_ACTIVE,
    TLS_GO_AHEAD,
    TLS_REQUIRED,
    TLS_UNAVAILABLE,
    TOO_MANY_ERRORS,
    TOO_MANY_JUNK,
    TOO_MANY_RECIPIENTS,
    UNRECOGNIZED,
    VRFY_REPLY,
    VRFY_SYNTAX,
)
from minismtp.states import (
    BDAT,
    CLOSED,
    COMMAND,
    CONNECT,
    DATA,
    END,
    ENDING,
    NEED_DATA,
    TLS,
    Closed,
    NeedData,
    StartTLS,
)
from minismtp.streaming import MAX_CHUNK, end_content, receive_chunk, receive_dotted
from minismtp.types import Address, Reply, Session, TLSInfo, Transaction

_HTTP_PROBES = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"CONNECT ", b"OPTIONS ", b"DELETE ")
_HEADER_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9-]*:")
# Octets as ints: "13 in line" is a memchr, while b"\r" in line costs ten times as much.
_CR, _LF = ord("\r"), ord("\n")


def _reply_with_status(reply: Reply) -> bytes:
    """Give an App reply the class-level enhanced status code it lacks (RFC 3463)."""
    if reply.status is None and reply.code >= 250:
        reply = attrs.evolve(reply, status=f"{reply.code // 100}.0.0")
    return bytes(reply)


class Engine:
    """One SMTP (or, with ``lmtp``, LMTP) session, server side. See the module docstring for
    the driving loop."""

    def __init__(
        self,
        session: Session,
        limits: Limits | None = None,
        *,
        tls_available: bool = False,
        require_tls: bool = False,
        lmtp: bool = False,
    ) -> None:
        self.session = session
        self.limits = limits or Limits()
        self.tls_available = tls_available
        self.require_tls = require_tls
        self.lmtp = lmtp
        session.lmtp = lmtp
        self.transaction: Transaction | None = None
        #: Transactions ended since the caller last emptied this list (for logs and metrics),
        #: each with its ``reply_code``: the final reply, or None if it was abandoned.
        self.finished: list[Transaction] = []
        self._state = CONNECT
        # The command side's bytes: what is left of the last read from ``_pos`` on. A read
        # is kept as it came and parsed where it lies: a batch of pipelined commands (or of
        # whole messages, from a client that does not wait for the 354) is never copied again
        # for each command taken off its front.
        self._buf = b""
        self._pos = 0
        self._out: list[bytes] = []  # replies queued, sent in one write
        self._pending: Event | None = None
        self._eof = False
        self._errors = 0
        self._junk = 0
        self._skipping_line = False  # inside a command line over the limit
        # Message content, DATA or BDAT: its reader (minismtp.content), and how many
        # DataChunk events it gave.
        self._content: DotReader | ChunkReader | None = None
        self._chunks = 0
        self._incoming: list[bytes] = []  # reads not yet looked at, while in DATA
        self._chunking = False  # this transaction has used BDAT
        # LMTP: each RCPT answered 2xx, duplicates too (the address as first accepted), in
        # RCPT order: each is owed a reply at the end of the content (RFC 2033 4.2).
        self._lmtp_recipients: list[Address] = []

    # -- the caller's side ------------------------------------------------------------------

    @property
    def receiving_data(self) -> bool:
        """True while message content streams in (DATA or a BDAT chunk)."""
        state = self._state
        return state is DATA or state is BDAT

    @property
    def in_transaction(self) -> bool:
        return self.transaction is not None or self.receiving_data

    @property
    def buffered(self) -> int:
        """Bytes of the client's held by the engine; bounded by the limits, whatever arrives."""
        held = len(self._buf) - self._pos + sum(map(len, self._incoming))
        return held + (self._content.held if self._content is not None else 0)

    @property
    def closed(self) -> bool:
        return self._state is CLOSED

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
        elif self._state is DATA:
            self._incoming.append(data)
        elif self._state is not CLOSED and self._state is not TLS:
            # Bytes that arrive while a STARTTLS handshake is pending were sent in the clear
            # after STARTTLS; they are dropped, never parsed (RFC 3207 4.2, CVE-2011-0411).
            if self._pos < len(self._buf):  # a command's start waits for its end
                self._buf = b"".join((memoryview(self._buf)[self._pos :], data))
            else:
                self._buf = data
            self._pos = 0

    def data_to_send(self) -> bytes:
        out = self._out
        if len(out) == 1:  # the usual case: one reply, written without a copy
            self._out = []
            return out[0]
        self._out = []
        return b"".join(out)

    def next_event(self) -> Event | NeedData | StartTLS | Closed:
        if self._pending is not None:
            raise RuntimeError(f"respond() to {type(self._pending).__name__} first")
        while True:
            state = self._state
            if state is COMMAND:
                result = self._next_command()
            elif state is DATA:
                result = receive_dotted(self)
            elif state is BDAT:
                result = receive_chunk(self)
            elif state is ENDING:
                result = end_content(self)
            elif state is CLOSED:
                return END
            elif state is CONNECT:
                self._pending = Connect(self.session)
                return self._pending
            else:
                raise RuntimeError("waiting for tls_started()")
            if result is not None:
                if isinstance(result, Event):
                    self._pending = result
                return result

    def respond(self, reply: Reply) -> None:
        """Answer the App event that :meth:`next_event` returned last."""
        event, self._pending = self._pending, None
        if event is None:
            raise RuntimeError("no event is waiting for a reply")
        accepted = 200 <= reply.code < 300
        if isinstance(event, DataChunk):
            if not accepted:
                # Answered at the end of the content, as the engine's own refusals are.
                self._refuse_content(_reply_with_status(reply))
        elif isinstance(event, Rcpt):
            self._out.append(_reply_with_status(reply))
            if accepted:
                event.transaction.rcpt_to.append(event.address)
                event.transaction.rcpt_params.append(event.params)
                if self.lmtp:
                    self._lmtp_recipients.append(event.address)
            else:
                transaction = event.transaction
                if transaction.refused_rcpts is None:
                    transaction.refused_rcpts = []
                transaction.refused_rcpts.append((event.address, reply))
        elif isinstance(event, Mail):
            self._out.append(_reply_with_status(reply))
            if accepted:
                self.transaction = event.transaction
        elif isinstance(event, Data):
            if self.lmtp or event.transaction.recipient_replies:
                accepted = self._answer_recipients(event.transaction, reply)
            else:
                self._out.append(_reply_with_status(reply))
            if accepted:
                self.session.transactions += 1
                self._junk = 0
            else:
                event.transaction.refusal = f"{reply.status or ''} {reply.lines[0]}".lstrip()
            self._reset_transaction(reply.code)
        elif isinstance(event, Helo):
            self._out.append(bytes(reply))
            if accepted:
                self.session.helo_name = event.name
                self.session.esmtp = event.esmtp
                self._reset_transaction()
        elif isinstance(event, Connect):
            self._out.append(bytes(reply))
            self._state = COMMAND if accepted else CLOSED
        if reply.code == 421:
            self._state = CLOSED

    def tls_started(self, info: TLSInfo) -> None:
        """The handshake succeeded: the session starts over and needs a new EHLO (RFC 3207 4.2)."""
        if self._state is not TLS:
            raise RuntimeError("no STARTTLS is pending")
        self.session.tls = info
        self.session.helo_name = None
        self.session.esmtp = False
        self._reset_transaction()
        self._buf, self._pos = b"", 0
        self._state = COMMAND

    def close(self, reply: Reply | None = None) -> None:
        """End the session from the server's side (timeout, shutdown), with a last reply."""
        if self._state is not CLOSED and reply is not None:
            self._out.append(bytes(reply))
        self._reset_transaction()
        self._state = CLOSED
        self._pending = None

    def _answer_recipients(self, transaction: Transaction, reply: Reply) -> bool:
        """Answer the end of the content with the recipients' outcomes: one reply per accepted
        RCPT in LMTP (RFC 2033 4.2), their fold in SMTP. True: some recipient was accepted."""
        outcomes = transaction.recipient_replies
        if not self.lmtp:
            folded = fold_replies(reply, [outcomes.get(a, reply) for a in transaction.rcpt_to])
            self._out.append(_reply_with_status(folded))
            return 200 <= folded.code < 300
        default = _reply_with_status(reply)
        recipients = self._lmtp_recipients
        if not outcomes:
            self._out.extend([default] * len(recipients))
            return 200 <= reply.code < 300
        accepted = False
        for address in recipients:
            outcome = outcomes.get(address)
            if outcome is None:
                self._out.append(default)
                accepted = accepted or 200 <= reply.code < 300
            else:
                self._out.append(_reply_with_status(outcome))
                accepted = accepted or 200 <= outcome.code < 300
        return accepted

    # -- commands ---------------------------------------------------------------------------

    def _next_command(self) -> Event | NeedData | StartTLS | Closed | None:
        """Parse one command line; None means a reply was queued and the loop goes on."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos)
        limit = self.limits.max_command_line
        if end < 0:
            if len(buf) - pos >= limit:
                # Skip the rest of this line without buffering it; keep a trailing CR, which
                # may be the first half of the line's end.
                self._buf, self._pos = (b"\r" if buf.endswith(b"\r") else b""), 0
                self._skipping_line = True
                return None if not self._eof else self._lost()
            return self._lost() if self._eof else NEED_DATA
        line = buf[pos:end]
        self._resume_commands(buf, end + 2)
        if self._skipping_line:
            self._skipping_line = False
            return self._error(LINE_TOO_LONG)
        if end + 2 - pos > limit:
            return self._error(LINE_TOO_LONG)
        if _LF in line or _CR in line:
            return self._error(BARE_LINE_END_IN_COMMAND)
        verb, _, arg = line.partition(b" ")
        handler = COMMANDS.get(verb.upper())
        if handler is None:
            if line.startswith(_HTTP_PROBES) or _HEADER_NAME.fullmatch(verb):
                # An HTTP request or proxy probe: a web client was pointed at us, or somebody
                # is trying a cross-protocol attack. End at once, answering nothing.
                self._state = CLOSED
                return END
            return self._error(UNRECOGNIZED)
        return handler(self, arg)

    def _resume_commands(self, data: bytes, pos: int) -> None:
        """Commands go on at ``data[pos:]``; a read taken to its end is let go at once (an
        idle connection must not keep its last read, up to a megabyte after a message)."""
        if pos < len(data):
            self._buf, self._pos = data, pos
        else:
            self._buf, self._pos = b"", 0

    def _lost(self) -> Closed:
        """The client closed its side; whatever it had half sent is dropped."""
        self._state = CLOSED
        self._reset_transaction()
        return END

    def _reply(self, reply: bytes) -> None:
        self._out.append(reply)

    def _error(self, reply: bytes) -> Closed | None:
        self._out.append(reply)
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            self._out.append(TOO_MANY_ERRORS)
            self._state = CLOSED
            return END
        return None

    def _junk_command(self, reply: bytes) -> Closed | None:
        self._out.append(reply)
        self._junk += 1
        if self._junk > self.limits.max_junk_commands:
            self._out.append(TOO_MANY_JUNK)
            self._state = CLOSED
            return END
        return None

    def _reset_transaction(self, reply_code: int | None = None) -> None:
        """End the transaction, if one is open, with the reply that ended it (None: abandoned)."""
        transaction = self.transaction
        if transaction is not None:
            transaction.reply_code = reply_code
            self.finished.append(transaction)
            # The one place that lets go of a message not handed over (one handed over is its
            # new owner's, and stays on the transaction for the record).
            self._release_message()
        self.transaction = None
        self._chunking = False
        self._content = None
        self._chunks = 0
        if self._lmtp_recipients:
            self._lmtp_recipients = []

    def _refuse_content(self, reply: bytes) -> None:
        """A DataChunk was refused: read the rest of the content, keep nothing of it."""
        reader = self._content
        if reader is not None:
            reader.refuse(reply)
        self._release_message()

    def _release_message(self) -> None:
        """Drop what was spooled of a message that will not be handed over."""
        transaction = self.transaction
        if transaction is not None:
            message = transaction.message
            if message is not None and transaction.message_id is None:
                transaction.message = None
                message.close()


# The names that lived here before the engine was split, importable from here as they were:
# the reply constants (now in minismtp.replies), Limits, fold_replies, ehlo_keywords.
__all__ = [
    "BAD_RECIPIENT",
    "BAD_SENDER",
    "BARE_LINE_END_IN_COMMAND",
    "BDAT_SYNTAX",
    "BYE",
    "DATA_AFTER_BDAT",
    "DATA_GO_AHEAD",
    "DUPLICATE_RECIPIENT",
    "EXPN_REPLY",
    "HELO_SYNTAX",
    "LINE_TOO_LONG",
    "LMTP_LHLO_SYNTAX",
    "LMTP_NEED_LHLO",
    "LMTP_NEED_RCPT",
    "LMTP_NOT_SMTP",
    "MAIL_SYNTAX",
    "MAX_CHUNK",
    "NEED_DATA",
    "NEED_HELO",
    "NEED_MAIL",
    "NEED_RCPT",
    "NEED_SMTPUTF8",
    "NESTED_MAIL",
    "NOT_UTF8",
    "NO_ARGUMENTS",
    "OK",
    "PARAMS_NEED_EHLO",
    "RCPT_SYNTAX",
    "TLS_ACTIVE",
    "TLS_GO_AHEAD",
    "TLS_REQUIRED",
    "TLS_UNAVAILABLE",
    "TOO_MANY_ERRORS",
    "TOO_MANY_JUNK",
    "TOO_MANY_RECIPIENTS",
    "UNRECOGNIZED",
    "VRFY_REPLY",
    "VRFY_SYNTAX",
    "Closed",
    "Engine",
    "Limits",
    "NeedData",
    "StartTLS",
    "ehlo_keywords",
    "fold_replies",
]
