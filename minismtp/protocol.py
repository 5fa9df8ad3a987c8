"""The sans-I/O SMTP and LMTP engine: bytes in, events out, replies to bytes (RFC 5321, RFC 2033
and extensions).

Like h11, the engine does no I/O. The caller feeds it what the client sent with
:meth:`Engine.receive_data`, asks :meth:`Engine.next_event` what to do next, answers the
App events (Connect, Helo, Mail, Rcpt, DataChunk, Data) with :meth:`Engine.respond`, and
writes out :meth:`Engine.data_to_send`. Everything the RFCs decide without the App -- syntax,
command sequence, limits, dot-stuffing, the end of data -- is decided here; the content
readers (DATA's dot reader, BDAT's chunk reader) are in :mod:`minismtp.content`.

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

import enum
import functools
import re
from collections.abc import Iterable

import attrs

from minismtp.content import TOO_BIG, ChunkReader, DotReader, Piece
from minismtp.events import Connect, Data, DataChunk, Event, Helo, Mail, Rcpt
from minismtp.paths import (
    ParameterError,
    PathError,
    UnknownParameter,
    check_mail_params,
    check_rcpt_params,
    parse_path_and_params,
)
from minismtp.types import Address, Reply, Session, TLSInfo, Transaction


@attrs.frozen
class Limits:
    """What one session may cost. Each limit follows RFC 5321 4.5.3 or Postfix's practice."""

    max_command_line: int = 512  # octets with CRLF (RFC 5321 4.5.3.1.4)
    max_text_line: int = 1000  # DATA lines with CRLF (RFC 5321 4.5.3.1.6); 0: unlimited
    max_message_size: int = 32 * 1024 * 1024  # advertised as SIZE (RFC 1870)
    max_recipients: int = 100  # RFC 5321 4.5.3.1.8 asks for at least 100
    max_errors: int = 20  # bad commands before 421 and close
    max_junk_commands: int = 100  # NOOP, RSET, VRFY, EXPN, HELP without a message in between
    accept_bare_line_endings: bool = False  # True: normalise bare CR/LF to CRLF, not 550
    # Octets of a message's content the App keeps in memory; past it, the spool is a file.
    spool_memory: int = 256 * 1024


class NeedData:
    """Write out :meth:`Engine.data_to_send`, then feed the engine more of the client's bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@attrs.frozen
class StartTLS:
    """The 220 for STARTTLS is queued: write it, do the handshake, then call ``tls_started``."""


@attrs.frozen
class Closed:
    """The session is over: write out what is queued and close the connection."""


_START_TLS = StartTLS()
_CLOSED = Closed()


class _State(enum.Enum):
    CONNECT = "connect"  # Connect event not yet asked for
    COMMAND = "command"
    DATA = "data"  # reading dot-terminated content
    BDAT = "bdat"  # reading a counted chunk
    ENDING = "ending"  # the content is complete: its last chunks, then Data
    TLS = "tls"  # waiting for the handshake
    CLOSED = "closed"


# The states read on every command and read, as plain globals: an Enum member lookup costs
# several times a global's.
_COMMAND, _DATA, _BDAT, _ENDING = _State.COMMAND, _State.DATA, _State.BDAT, _State.ENDING

#: The largest DataChunk the engine hands on: a larger settled piece (a large read, fed whole)
#: goes out as views of it, so that a spool writes and a hook scans bounded pieces.
MAX_CHUNK = 256 * 1024


def _r(code: int, status: str | None, text: str) -> bytes:
    return bytes(Reply(code, status, text))


# Replies the engine gives itself, encoded once.
OK = _r(250, "2.0.0", "OK")
DATA_GO_AHEAD = _r(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = _r(221, "2.0.0", "Bye")
TLS_GO_AHEAD = _r(220, "2.0.0", "Ready to start TLS")
VRFY_REPLY = _r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_REPLY = _r(502, "5.5.1", "EXPN not supported")
UNRECOGNIZED = _r(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = _r(500, "5.5.2", "Line too long")
BARE_LINE_END_IN_COMMAND = _r(500, "5.5.2", "Syntax error, bare CR or LF in command line")
NOT_UTF8 = _r(500, "5.5.2", "Syntax error, invalid characters in command")
NO_ARGUMENTS = _r(501, "5.5.4", "Syntax error, no parameters allowed")
HELO_SYNTAX = _r(501, "5.5.4", "Syntax: HELO/EHLO domain")
MAIL_SYNTAX = _r(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = _r(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
BAD_SENDER = _r(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = _r(501, "5.1.3", "Bad recipient address syntax")
VRFY_SYNTAX = _r(501, "5.5.4", "Syntax: VRFY address")
BDAT_SYNTAX = _r(501, "5.5.4", "Syntax: BDAT size [LAST]")
NEED_HELO = _r(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = _r(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = _r(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = _r(554, "5.5.1", "Error: no valid recipients")
# RFC 2033 4.2: in LMTP, DATA without a successful RCPT MUST fail with 503.
LMTP_NEED_RCPT = _r(503, "5.5.1", "Error: no valid recipients")
LMTP_NEED_LHLO = _r(503, "5.5.1", "Error: send LHLO first")
LMTP_LHLO_SYNTAX = _r(501, "5.5.4", "Syntax: LHLO domain")
# RFC 2033 4.1: an LMTP server does not answer HELO or EHLO as SMTP would.
LMTP_NOT_SMTP = _r(500, "5.5.1", "Error: this is an LMTP server, send LHLO")
DUPLICATE_RECIPIENT = _r(250, "2.1.5", "OK (duplicate recipient)")
DATA_AFTER_BDAT = _r(503, "5.5.1", "Error: DATA not allowed after BDAT")
TLS_ACTIVE = _r(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = _r(502, "5.5.1", "Error: STARTTLS not available")
TLS_REQUIRED = _r(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_SMTPUTF8 = _r(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
PARAMS_NEED_EHLO = _r(555, "5.5.4", "Parameters need EHLO")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")
TOO_MANY_ERRORS = _r(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_JUNK = _r(421, "4.7.0", "Too many commands without a message, closing connection")

_HTTP_PROBES = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"CONNECT ", b"OPTIONS ", b"DELETE ")
_HEADER_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9-]*:")
# Octets as ints: "13 in line" is a memchr, while b"\r" in line costs ten times as much.
_CR, _LF = ord("\r"), ord("\n")


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


def _reply_with_status(reply: Reply) -> bytes:
    """Give an App reply the class-level enhanced status code it lacks (RFC 3463)."""
    if reply.status is None and reply.code >= 250:
        reply = attrs.evolve(reply, status=f"{reply.code // 100}.0.0")
    return bytes(reply)


@functools.lru_cache(maxsize=16)
def ehlo_keywords(max_size: int, offer_tls: bool) -> tuple[str, ...]:
    """The extensions the engine honours, as EHLO (and LHLO) keyword lines; PIPELINING and
    ENHANCEDSTATUSCODES are always among them, as RFC 2033 4.1 wants of LMTP."""
    keywords = [
        "PIPELINING",
        f"SIZE {max_size}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
    ]
    if offer_tls:
        keywords.append("STARTTLS")
    keywords.append("HELP")
    return tuple(keywords)


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
        self._state = _State.CONNECT
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
        return state is _DATA or state is _BDAT

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
        return self._state is _State.CLOSED

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
        elif self._state is _DATA:
            self._incoming.append(data)
        elif self._state is not _State.CLOSED and self._state is not _State.TLS:
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
            if state is _COMMAND:
                result = self._next_command()
            elif state is _DATA:
                result = self._receive_dotted()
            elif state is _BDAT:
                result = self._receive_chunk()
            elif state is _ENDING:
                result = self._end_content()
            elif state is _State.CLOSED:
                return _CLOSED
            elif state is _State.CONNECT:
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
            self._state = _State.COMMAND if accepted else _State.CLOSED
        if reply.code == 421:
            self._state = _State.CLOSED

    def tls_started(self, info: TLSInfo) -> None:
        """The handshake succeeded: the session starts over and needs a new EHLO (RFC 3207 4.2)."""
        if self._state is not _State.TLS:
            raise RuntimeError("no STARTTLS is pending")
        self.session.tls = info
        self.session.helo_name = None
        self.session.esmtp = False
        self._reset_transaction()
        self._buf, self._pos = b"", 0
        self._state = _State.COMMAND

    def close(self, reply: Reply | None = None) -> None:
        """End the session from the server's side (timeout, shutdown), with a last reply."""
        if self._state is not _State.CLOSED and reply is not None:
            self._out.append(bytes(reply))
        self._reset_transaction()
        self._state = _State.CLOSED
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

    def _answer_content_failure(self, reply: bytes) -> None:
        """The engine refused the content (size, line length, bare line ends): in LMTP every
        accepted RCPT is owed that reply at the end of the content (RFC 2033 4.2), in SMTP the
        message is; a BDAT chunk that is not the last is owed one reply whatever the mode."""
        reader = self._content
        ending = not isinstance(reader, ChunkReader) or reader.last
        owed = len(self._lmtp_recipients) if self.lmtp and ending else 1
        self._out.extend([reply] * max(owed, 1))

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
        handler = _COMMANDS.get(verb.upper())
        if handler is None:
            if line.startswith(_HTTP_PROBES) or _HEADER_NAME.fullmatch(verb):
                # An HTTP request or proxy probe: a web client was pointed at us, or somebody
                # is trying a cross-protocol attack. End at once, answering nothing.
                self._state = _State.CLOSED
                return _CLOSED
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
        self._state = _State.CLOSED
        self._reset_transaction()
        return _CLOSED

    def _reply(self, reply: bytes) -> None:
        self._out.append(reply)

    def _error(self, reply: bytes) -> Closed | None:
        self._out.append(reply)
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            self._out.append(TOO_MANY_ERRORS)
            self._state = _State.CLOSED
            return _CLOSED
        return None

    def _junk_command(self, reply: bytes) -> Closed | None:
        self._out.append(reply)
        self._junk += 1
        if self._junk > self.limits.max_junk_commands:
            self._out.append(TOO_MANY_JUNK)
            self._state = _State.CLOSED
            return _CLOSED
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

    def _text(self, arg: bytes) -> str | None:
        try:
            return arg.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _helo(self, arg: bytes, esmtp: bool) -> Event | Closed | None:
        name = self._text(arg.strip(b" "))
        if not name:
            return self._error(LMTP_LHLO_SYNTAX if self.lmtp else HELO_SYNTAX)
        keywords = ehlo_keywords(
            self.limits.max_message_size, self.tls_available and self.session.tls is None
        )
        return Helo(self.session, name, esmtp, keywords if esmtp else ())

    def _cmd_helo(self, arg: bytes) -> Event | Closed | None:
        if self.lmtp:
            return self._error(LMTP_NOT_SMTP)
        return self._helo(arg, esmtp=False)

    def _cmd_ehlo(self, arg: bytes) -> Event | Closed | None:
        if self.lmtp:
            return self._error(LMTP_NOT_SMTP)
        return self._helo(arg, esmtp=True)

    def _cmd_lhlo(self, arg: bytes) -> Event | Closed | None:
        """RFC 2033 4.1: LMTP's greeting, EHLO's in all but name (a Helo event, ``esmtp``)."""
        if not self.lmtp:
            return self._error(UNRECOGNIZED)
        return self._helo(arg, esmtp=True)

    def _cmd_mail(self, arg: bytes) -> Event | Closed | None:
        session = self.session
        if session.helo_name is None:
            return self._error(LMTP_NEED_LHLO if self.lmtp else NEED_HELO)
        if self.transaction is not None:
            return self._error(NESTED_MAIL)
        if self.require_tls and session.tls is None:
            return self._error(TLS_REQUIRED)
        text = self._text(arg)
        if text is None:
            return self._error(NOT_UTF8)
        ascii_only = arg.isascii()
        try:
            command = parse_path_and_params(text, "FROM:", utf8=not ascii_only)
            if command.postmaster:
                raise PathError("<postmaster> is a recipient")
            params = command.params
            if params:
                if not session.esmtp:
                    return self._error(PARAMS_NEED_EHLO)
                check_mail_params(params)
        except UnknownParameter:
            return self._error(_r(555, "5.5.4", "Unsupported parameter"))
        except ParameterError:
            return self._error(MAIL_SYNTAX)
        except PathError:
            return self._error(MAIL_SYNTAX if text[:5].upper() != "FROM:" else BAD_SENDER)
        if params:
            if not ascii_only and "SMTPUTF8" not in params:
                return self._error(NEED_SMTPUTF8)
            size = params.get("SIZE")
            if size is not None and int(size) > self.limits.max_message_size:
                self._reply(TOO_BIG)
                return None
        elif not ascii_only:
            return self._error(NEED_SMTPUTF8)
        transaction = Transaction(
            session, command.address, params, max_size=self.limits.max_message_size
        )
        return Mail(session, transaction, command.address, params)

    def _cmd_rcpt(self, arg: bytes) -> Event | Closed | None:
        transaction = self.transaction
        if transaction is None:
            return self._error(NEED_MAIL)
        text = self._text(arg)
        if text is None:
            return self._error(NOT_UTF8)
        utf8 = transaction.smtputf8
        try:
            command = parse_path_and_params(text, "TO:", utf8=utf8)
            if command.address.is_null:
                raise PathError("<> is not a recipient")
            if command.params:
                check_rcpt_params(command.params)
        except UnknownParameter:
            return self._error(_r(555, "5.5.4", "Unsupported parameter"))
        except ParameterError:
            return self._error(RCPT_SYNTAX)
        except PathError:
            if not utf8 and not arg.isascii():
                return self._error(NEED_SMTPUTF8)
            return self._error(RCPT_SYNTAX if text[:3].upper() != "TO:" else BAD_RECIPIENT)
        address = command.address
        recipients = transaction.rcpt_to
        if recipients:
            key = (address.local_part, address.domain.lower())
            for earlier in recipients:
                if (earlier.local_part, earlier.domain.lower()) == key:
                    # Delivered once; in LMTP still owed its own reply after the content
                    # (RFC 2033 4.2: one per RCPT that succeeded).
                    if self.lmtp:
                        self._lmtp_recipients.append(earlier)
                    self._reply(DUPLICATE_RECIPIENT)
                    return None
        if len(transaction.rcpt_to) >= self.limits.max_recipients:
            self._reply(TOO_MANY_RECIPIENTS)
            return None
        return Rcpt(self.session, transaction, address, command.params)

    def _cmd_data(self, arg: bytes) -> Event | Closed | None:
        if arg:
            return self._error(NO_ARGUMENTS)
        transaction = self.transaction
        if transaction is None:
            return self._error(NEED_MAIL)
        if self._chunking:
            return self._error(DATA_AFTER_BDAT)
        if not transaction.rcpt_to:
            return self._error(LMTP_NEED_RCPT if self.lmtp else NEED_RCPT)
        self._reply(DATA_GO_AHEAD)
        limits = self.limits
        self._content = DotReader(
            transaction.max_size, limits.max_text_line, limits.accept_bare_line_endings
        )
        self._state = _State.DATA  # what follows DATA in the command buffer is content now
        return None

    def _cmd_bdat(self, arg: bytes) -> Event | Closed | None:
        size, _, last = arg.partition(b" ")
        if not size.isdigit() or len(size) > 20 or last.upper() not in (b"", b"LAST"):
            return self._error(BDAT_SYNTAX)
        # RFC 3030 3: a chunk is read in full even when it is refused.
        transaction = self.transaction
        reader = self._content
        if not isinstance(reader, ChunkReader) or transaction is None or not transaction.rcpt_to:
            reader = self._content = ChunkReader(
                transaction.max_size if transaction else 0, self.limits.accept_bare_line_endings
            )
            if transaction is None:
                reader.failure = NEED_MAIL
            elif not transaction.rcpt_to:
                reader.failure = NEED_RCPT
            else:
                self._chunking = True
        reader.start(int(size), bool(last))
        self._state = _State.BDAT
        return None

    def _cmd_rset(self, arg: bytes) -> Event | Closed | None:
        if arg:
            return self._error(NO_ARGUMENTS)
        self._reset_transaction()
        return self._junk_command(OK)

    def _cmd_noop(self, arg: bytes) -> Event | Closed | None:
        return self._junk_command(OK)

    def _cmd_vrfy(self, arg: bytes) -> Event | Closed | None:
        if not arg.strip():
            return self._error(VRFY_SYNTAX)
        return self._junk_command(VRFY_REPLY)

    def _cmd_expn(self, arg: bytes) -> Event | Closed | None:
        return self._junk_command(EXPN_REPLY)

    def _cmd_help(self, arg: bytes) -> Event | Closed | None:
        greetings = "LHLO" if self.lmtp else "HELO EHLO"
        verbs = f"{greetings} MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
        if self.tls_available and self.session.tls is None:
            verbs += " STARTTLS"
        return self._junk_command(_r(214, "2.0.0", f"Commands: {verbs}"))

    def _cmd_quit(self, arg: bytes) -> Event | Closed | None:
        if arg:
            return self._error(NO_ARGUMENTS)
        self._reply(BYE)
        self._reset_transaction()
        self._state = _State.CLOSED
        return _CLOSED

    def _cmd_starttls(self, arg: bytes) -> StartTLS | Closed | None:
        if arg:
            return self._error(NO_ARGUMENTS)
        if not self.tls_available:
            return self._error(TLS_UNAVAILABLE)
        if self.session.tls is not None:
            return self._error(TLS_ACTIVE)
        self._reply(TLS_GO_AHEAD)
        # Whatever the client pipelined after STARTTLS came in the clear: drop it unread.
        self._buf, self._pos = b"", 0
        self._state = _State.TLS
        return _START_TLS

    # -- message content --------------------------------------------------------------------

    def _receive_dotted(self) -> Event | NeedData | Closed | None:
        """DATA content, through the dot reader (:mod:`minismtp.content`)."""
        reader = self._content
        assert isinstance(reader, DotReader)
        if reader.pieces:
            return self._data_chunk(reader.pieces)
        incoming = self._incoming
        data, start = self._buf, self._pos
        if start < len(data):  # sent right after DATA, in the read that carried it
            self._buf, self._pos = b"", 0
            if incoming:
                data, start = b"".join((memoryview(data)[start:], *incoming)), 0
        elif incoming:
            data, start = (incoming[0] if len(incoming) == 1 else b"".join(incoming)), 0
        else:
            return self._lost() if self._eof else NEED_DATA
        incoming.clear()
        where = reader.feed(data, start)
        if reader.failure is not None:
            self._release_message()
        if where is not None:  # the end of data: the commands after it, parsed where they lie
            self._resume_commands(*where)
            self._state = _ENDING
        return None

    def _receive_chunk(self) -> Event | NeedData | Closed | None:
        """A BDAT chunk, through the chunk reader: exactly the announced number of octets."""
        reader = self._content
        assert isinstance(reader, ChunkReader)
        if reader.pieces:
            return self._data_chunk(reader.pieces)
        if reader.remaining:
            buf, pos = self._buf, self._pos
            if pos < len(buf):
                self._resume_commands(buf, reader.feed(buf, pos))
                if reader.failure is not None:
                    self._release_message()
                return None
            return self._lost() if self._eof else NEED_DATA
        failure = reader.failure
        if failure is NEED_MAIL or failure is NEED_RCPT:
            self._state = _COMMAND
            self._content = None
            return self._error(LMTP_NEED_RCPT if failure is NEED_RCPT and self.lmtp else failure)
        if reader.last or failure is not None:  # a failed chunk fails the transaction too
            self._state = _ENDING
            return None
        self._state = _COMMAND
        self._reply(_r(250, "2.0.0", f"{reader.size} octets received"))
        return None

    def _data_chunk(self, pieces: list[Piece]) -> DataChunk:
        """The next settled piece of content, at most :data:`MAX_CHUNK` octets of it."""
        piece = pieces[0]
        if len(piece) > MAX_CHUNK:
            view = memoryview(piece)
            pieces[0] = view[MAX_CHUNK:]
            piece = view[:MAX_CHUNK]
        else:
            del pieces[0]
        transaction = self.transaction
        assert transaction is not None
        self._chunks += 1
        return DataChunk(self.session, transaction, piece)

    def _end_content(self) -> Event | None:
        """The content is complete: its pieces not yet handed on, then the Data event, or the
        refusal."""
        reader = self._content
        assert reader is not None
        if reader.pieces:
            return self._data_chunk(reader.pieces)
        failure = reader.failure
        transaction = self.transaction
        if failure is None and transaction is not None and not self._chunks:
            # An empty message: one empty chunk all the same, so that the message exists
            # (the App makes it at the first chunk) when Data asks about it.
            self._chunks = 1
            return DataChunk(self.session, transaction, b"")
        self._state = _COMMAND
        if failure is not None or transaction is None:
            failure = failure or NEED_MAIL
            if transaction is not None:
                transaction.size = reader.size  # for the log: how far it got
                transaction.refusal = failure[4:].decode("ascii", "replace").rstrip()
            self._answer_content_failure(failure)
            self._reset_transaction(int(failure[:3]))
            return None
        transaction.size = reader.size
        return Data(self.session, transaction)

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


_COMMANDS = {
    b"HELO": Engine._cmd_helo,
    b"EHLO": Engine._cmd_ehlo,
    b"LHLO": Engine._cmd_lhlo,
    b"MAIL": Engine._cmd_mail,
    b"RCPT": Engine._cmd_rcpt,
    b"DATA": Engine._cmd_data,
    b"BDAT": Engine._cmd_bdat,
    b"RSET": Engine._cmd_rset,
    b"NOOP": Engine._cmd_noop,
    b"VRFY": Engine._cmd_vrfy,
    b"EXPN": Engine._cmd_expn,
    b"HELP": Engine._cmd_help,
    b"QUIT": Engine._cmd_quit,
    b"STARTTLS": Engine._cmd_starttls,
}
