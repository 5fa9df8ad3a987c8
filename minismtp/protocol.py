"""The sans-I/O SMTP engine: bytes in, events out, replies to bytes (RFC 5321 and extensions).

Like h11, the engine does no I/O. The caller feeds it what the client sent with
:meth:`Engine.receive_data`, asks :meth:`Engine.next_event` what to do next, answers the
App events (Connect, Helo, Mail, Rcpt, Data) with :meth:`Engine.respond`, and writes out
:meth:`Engine.data_to_send`. Everything the RFCs decide without the App -- syntax, command
sequence, limits, dot-stuffing, the end of data -- is decided here.
"""

from __future__ import annotations

import enum
import functools
import re

import attrs

from minismtp.events import Connect, Data, Event, Helo, Mail, Rcpt
from minismtp.paths import (
    ParameterError,
    PathError,
    UnknownParameter,
    check_mail_params,
    check_rcpt_params,
    parse_path_and_params,
)
from minismtp.types import Reply, Session, TLSInfo, Transaction


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
    TLS = "tls"  # waiting for the handshake
    CLOSED = "closed"


# The states read on every command and read, as plain globals: an Enum member lookup costs
# several times a global's.
_COMMAND, _DATA, _BDAT = _State.COMMAND, _State.DATA, _State.BDAT


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
DATA_AFTER_BDAT = _r(503, "5.5.1", "Error: DATA not allowed after BDAT")
TLS_ACTIVE = _r(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = _r(502, "5.5.1", "Error: STARTTLS not available")
TLS_REQUIRED = _r(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_SMTPUTF8 = _r(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
PARAMS_NEED_EHLO = _r(555, "5.5.4", "Parameters need EHLO")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")
TOO_BIG = _r(552, "5.3.4", "Message size exceeds fixed maximum message size")
TEXT_LINE_TOO_LONG = _r(500, "5.5.2", "Message line too long")
BARE_LINE_END_IN_DATA = _r(550, "5.5.2", "Message contains bare CR or LF")
TOO_MANY_ERRORS = _r(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_JUNK = _r(421, "4.7.0", "Too many commands without a message, closing connection")

_HTTP_PROBES = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"CONNECT ", b"OPTIONS ", b"DELETE ")
_HEADER_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9-]*:")
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
# A CR not followed by LF; an LF not preceded by CR; an LF that is bare or starts a line with
# a dot (stuffed, or the end of data). Each pattern starts with one literal octet, which the
# re module finds with a tight scan in C; only where it finds one does it look around. That
# costs about half of counting CRLF, CR and LF on 80-octet lines, but more on short ones (a
# message of empty lines about 9 ms/MB, five times the counts).
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_DOT_LINE_OR_BARE_LF = re.compile(rb"\n(?:\.|(?<!\r\n))")
# The re module also finds these literals faster than bytes.find() and bytes.replace() do
# (0.3 against 0.44 ms/MB for the end of data; 0.8 against 1.2 to unstuff every line).
_END_OF_DATA = re.compile(rb"\r\n\.\r\n")
_UNSTUFF = re.compile(rb"\r\n\.")  # a CRLF-dot line start loses its dot
_CRLF = b"\r\n"
# Octets as ints: "13 in line" is a memchr, while b"\r" in line costs ten times as much.
_CR, _LF = ord("\r"), ord("\n")
# Below this, a read is joined to the tail and scanned as one: copying a few KB costs less
# than settling its first line apart (about 1.5 µs of Python per read).
_SMALL_READ = 16 * 1024


def _has_bare_line_end(text: bytes) -> bool:
    """Whether ``text`` holds a CR or LF outside a CRLF (most texts: none at all, two memchr)."""
    return (_CR in text or _LF in text) and (
        _BARE_CR.search(text) is not None or _BARE_LF.search(text) is not None
    )


def _pieces_have_bare_line_end(pieces: list[bytes | memoryview]) -> bool:
    """Whether the pieces joined hold a CR or LF outside a CRLF, without joining them: a
    CRLF may be split between two pieces."""
    after_cr = False  # the last piece ended with a CR
    for piece in pieces:
        if not piece:
            continue
        if after_cr != (piece[0] == _LF):  # a CR without its LF, or an LF without its CR
            return True
        cr = _BARE_CR.search(piece)
        if cr is not None and cr.start() != len(piece) - 1:  # a CR at the end may be a CRLF's
            return True
        if _BARE_LF.search(piece, 1):  # the LF at 0 was checked against the last piece
            return True
        after_cr = piece[-1] == _CR
    return after_cr


def _reply_with_status(reply: Reply) -> bytes:
    """Give an App reply the class-level enhanced status code it lacks (RFC 3463)."""
    if reply.status is None and reply.code >= 250:
        reply = attrs.evolve(reply, status=f"{reply.code // 100}.0.0")
    return bytes(reply)


@functools.lru_cache(maxsize=16)
def ehlo_keywords(max_size: int, offer_tls: bool) -> tuple[str, ...]:
    """The extensions the engine honours, as EHLO keyword lines."""
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
    """One SMTP session, server side. See the module docstring for the driving loop."""

    def __init__(
        self,
        session: Session,
        limits: Limits | None = None,
        *,
        tls_available: bool = False,
        require_tls: bool = False,
    ) -> None:
        self.session = session
        self.limits = limits or Limits()
        self.tls_available = tls_available
        self.require_tls = require_tls
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
        # Message content, DATA or BDAT: kept as a list of settled (unstuffed) pieces, so a
        # large message is copied once more only, by the final join.
        self._parts: list[bytes | memoryview] = []
        self._size = 0  # octets of content kept so far
        self._content_failure: bytes | None = None  # the reply once content is refused
        self._incoming: list[bytes] = []  # reads not yet looked at, while in DATA
        self._tail = b""  # DATA bytes not yet settled: from the last CRLF on
        self._skip = 0  # octets of the CRLF put before the content still to strip
        self._bdat_remaining = 0
        self._bdat_last = False
        self._chunking = False  # this transaction has used BDAT

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
        held = len(self._buf) - self._pos + len(self._tail) + self._size
        return held + sum(map(len, self._incoming))

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
        if isinstance(event, Rcpt):
            self._out.append(_reply_with_status(reply))
            if accepted:
                event.transaction.rcpt_to.append(event.address)
                event.transaction.rcpt_params.append(event.params)
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
        self.transaction = None
        self._chunking = False
        self._parts = []
        self._size = 0
        self._content_failure = None

    def _text(self, arg: bytes) -> str | None:
        try:
            return arg.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _helo(self, arg: bytes, esmtp: bool) -> Event | Closed | None:
        name = self._text(arg.strip(b" "))
        if not name:
            return self._error(HELO_SYNTAX)
        keywords = ehlo_keywords(
            self.limits.max_message_size, self.tls_available and self.session.tls is None
        )
        return Helo(self.session, name, esmtp, keywords if esmtp else ())

    def _cmd_helo(self, arg: bytes) -> Event | Closed | None:
        return self._helo(arg, esmtp=False)

    def _cmd_ehlo(self, arg: bytes) -> Event | Closed | None:
        return self._helo(arg, esmtp=True)

    def _cmd_mail(self, arg: bytes) -> Event | Closed | None:
        session = self.session
        if session.helo_name is None:
            return self._error(NEED_HELO)
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
        key = (address.local_part, address.domain.lower())
        recipients = transaction.rcpt_to
        if recipients and any((a.local_part, a.domain.lower()) == key for a in recipients):
            self._reply(_r(250, "2.1.5", "OK (duplicate recipient)"))
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
            return self._error(NEED_RCPT)
        self._reply(DATA_GO_AHEAD)
        # The content is searched as if preceded by a CRLF, so that an empty message (a lone
        # "." line) and a first line starting with a dot need no special case.
        self._tail = b"\r\n"
        self._skip = 2
        self._state = _State.DATA  # what follows DATA in the command buffer is content now
        return None

    def _cmd_bdat(self, arg: bytes) -> Event | Closed | None:
        size, _, last = arg.partition(b" ")
        if not size.isdigit() or len(size) > 20 or last.upper() not in (b"", b"LAST"):
            return self._error(BDAT_SYNTAX)
        self._bdat_remaining = int(size)
        self._bdat_last = bool(last)
        # RFC 3030 3: a chunk is read in full even when it is refused.
        transaction = self.transaction
        if transaction is None:
            self._content_failure = NEED_MAIL
        elif not transaction.rcpt_to:
            self._content_failure = NEED_RCPT
        else:
            self._chunking = True
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
        verbs = "HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
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
        """DATA content: each read is scanned a few times in C, whole, never line by line.

        A read is settled up to its last CRLF; the rest, from that CRLF on, waits in the tail.
        The next read's first line is joined to the tail (a copy of a line, not of the read),
        so that an end of data, a stuffed dot or a CRLF split between two reads is seen
        whole there; the rest of the read is settled where it lies.
        """
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
        if len(data) - start < _SMALL_READ or (first := data.find(_CRLF, start) + 2) == 1:
            # A small read (a message of a few KB), or one long line: joined to the tail whole.
            ended = self._take(b"".join((self._tail, memoryview(data)[start:])), 0)
        else:
            ended = self._take(b"".join((self._tail, memoryview(data)[start:first])), 0)
            if ended:  # the read's first line ended the data: commands follow, in place
                self._resume_commands(data, first)
            else:  # the head ended with the read's first CRLF: the rest starts there
                ended = self._take(data, first - 2)
        if ended:
            return self._finish_content()
        self._bound_tail()
        return None

    def _take(self, segment: bytes, start: int) -> bool:
        """Settle ``segment[start:]``, which starts with a CRLF, up to its last CRLF (the new
        tail starts there); True: up to the end of data instead (the rest is for the command
        parser)."""
        cut = segment.rfind(_CRLF, start)
        # Most reads of most messages have no line that starts with a dot, and then there is
        # nothing to unstuff and no end of data: the scan for bare LFs tells on the way.
        found = _DOT_LINE_OR_BARE_LF.search(segment, start, cut)
        if found is None:
            self._settle(segment, start, cut, cut + 2, dots=False, bare_lf=False)
            self._tail = segment[cut:]
            return False
        odd = found.start()
        bare_lf = found.end() - odd == 1
        end = _END_OF_DATA.search(segment, odd - 1, cut + 2)
        if end is None:
            self._settle(segment, start, cut, cut + 2, dots=True, bare_lf=bare_lf)
            self._tail = segment[cut:]
            return False
        content_end = end.start() + 2  # up to the CRLF before the dot
        # The LFs before the first dot line were checked on the way to it: when that line is
        # the end of data, there is nothing to unstuff, and no bare LF.
        dots = end.start() + 1 != odd
        self._settle(segment, start, content_end, content_end, dots=dots, bare_lf=bare_lf)
        rest = end.end()
        self._tail = b""
        self._state = _State.COMMAND
        self._resume_commands(segment, rest)  # the commands after it, parsed where they lie
        return True

    def _bound_tail(self) -> None:
        """A line that does not end must not be held whole: past the limits it refuses the
        message, and only what an end of data could still start with is kept of it."""
        tail = self._tail
        max_line = self.limits.max_text_line
        if len(tail) <= max_line + 4:  # the usual case: a line's start (or the end's: CRLF ".")
            return
        if self._content_failure is None:
            transaction = self.transaction
            assert transaction is not None
            line_start = max(tail.rfind(b"\n", 2) + 1, 2)  # past a bare LF, when normalising
            if max_line and len(tail) - line_start > max_line:
                self._refuse_content(TEXT_LINE_TOO_LONG)
            elif self._size + len(tail) > transaction.max_size + 3:  # 3: CRLF, stuffed dot
                self._refuse_content(TOO_BIG)
            else:
                return
        # A line has begun (not a dot line, not the end of data); a CR may be half a CRLF.
        self._tail = b"\r\nx\r" if tail.endswith(b"\r") else b"\r\nx"

    def _settle(
        self, segment: bytes, start: int, cut: int, lines_end: int, *, dots: bool, bare_lf: bool
    ) -> None:
        """Check, unstuff and keep ``segment[start:cut]``, which starts with a CRLF.

        Its lines are complete up to ``lines_end`` (``cut + 2``: the CRLF at ``cut`` ends the
        last one); ``dots``: some line in it may start with a dot, and its LFs are not all
        checked yet; ``bare_lf``: it has a bare LF.
        """
        if cut <= start:
            return
        skip = start + self._skip
        self._skip = 0
        if self._content_failure is not None:
            return
        max_line = self.limits.max_text_line
        if max_line:
            # Jump from line end to line end a line's maximum at a time: a few Python steps
            # per kilobyte, whatever the lines are. Once less than that is left, the rest
            # are whole lines (the region ends with a line end), each short enough.
            pos = start + 2
            rfind = segment.rfind
            while lines_end - pos > max_line:
                newline = rfind(b"\n", pos, pos + max_line)
                if newline < 0:
                    self._refuse_content(TEXT_LINE_TOO_LONG)
                    return
                pos = newline + 1
        if not bare_lf:
            if dots:
                # As _UNSTUFF.sub(), a tenth cheaper: one list item per dot line, not two.
                lines = _UNSTUFF.split(memoryview(segment)[start:cut])
                # What is left between the CRLF-dots, a NUL in place of each, holds every
                # other CR and LF of the segment beside its neighbours there. A stuffed line
                # has none: one memchr then stands for the scans for bare CRs and LFs.
                if not _has_bare_line_end(b"\0".join(lines)):
                    piece = _CRLF.join(lines)
                    self._keep(memoryview(piece)[skip - start :] if skip > start else piece)
                    return
            elif _BARE_CR.search(segment, start, cut) is None:
                # Nothing to unstuff: keep a view of the segment, not a copy (join takes views).
                self._keep(memoryview(segment)[skip:cut])
                return
        # A CR or LF outside a CRLF.
        if not self.limits.accept_bare_line_endings:
            self._refuse_content(BARE_LINE_END_IN_DATA)
            return
        # Unstuff first, so that only real CRLF-dot line starts lose their dot.
        piece = _UNSTUFF.sub(_CRLF, segment[start:cut])
        self._keep(_BARE_LINE_END.sub(_CRLF, piece)[skip - start :])

    def _keep(self, piece: bytes | memoryview) -> None:
        self._size += len(piece)
        transaction = self.transaction
        assert transaction is not None
        if self._size > transaction.max_size:
            self._refuse_content(TOO_BIG)
        elif piece:
            self._parts.append(piece)

    def _refuse_content(self, reply: bytes) -> None:
        """Refused while streaming: keep reading to the end, but keep nothing."""
        if self.transaction is not None:
            self.transaction.size = self._size  # for the log: how far it got
        self._content_failure = reply
        self._parts = []
        self._size = 0

    def _receive_chunk(self) -> Event | NeedData | Closed | None:
        """A BDAT chunk: exactly the announced number of octets, which are not parsed."""
        buf, pos = self._buf, self._pos
        take = min(self._bdat_remaining, len(buf) - pos)
        if take:
            if self._content_failure is None:
                self._keep(buf if take == len(buf) else buf[pos : pos + take])
            self._resume_commands(buf, pos + take)
            self._bdat_remaining -= take
        if self._bdat_remaining:
            return self._lost() if self._eof else NEED_DATA
        self._state = _State.COMMAND
        failure = self._content_failure
        if failure is NEED_MAIL or failure is NEED_RCPT:
            self._content_failure = None
            return self._error(failure)
        if failure is None and not self._bdat_last:
            self._reply(_r(250, "2.0.0", f"{self._size} octets received"))
            return None
        if failure is None and _pieces_have_bare_line_end(self._parts):
            # Checked in the pieces: the App joins them once, with its trace header in front.
            if not self.limits.accept_bare_line_endings:
                self._content_failure = BARE_LINE_END_IN_DATA
            else:
                self._parts = [_BARE_LINE_END.sub(_CRLF, b"".join(self._parts))]
        return self._finish_content()

    def _finish_content(self) -> Event | None:
        """The content is complete: refuse it, or ask the App with a Data event."""
        failure = self._content_failure
        transaction = self.transaction
        if failure is not None or transaction is None:
            failure = failure or NEED_MAIL
            if transaction is not None:
                transaction.refusal = failure[4:].decode("ascii", "replace").rstrip()
            self._reply(failure)
            self._reset_transaction(int(failure[:3]))
            return None
        # Handed over unjoined: the App joins them once, with its trace header in front.
        data = Data(self.session, transaction, self._parts)
        transaction.size = data.size
        self._parts = []
        self._size = 0
        return data


_COMMANDS = {
    b"HELO": Engine._cmd_helo,
    b"EHLO": Engine._cmd_ehlo,
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
