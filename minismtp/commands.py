"""The engine's command handlers: one function per SMTP and LMTP verb (RFC 5321 4.1, RFC 2033,
RFC 3030 for BDAT, RFC 3207 for STARTTLS).

:meth:`~minismtp.protocol.Engine.next_event` takes a command line off the client's bytes and
calls ``COMMANDS[verb](engine, arg)``: a plain function, as cheap to call as the method it
was. A handler checks the syntax and the command sequence, queues the replies the RFCs decide
without the App, and returns the event that asks the App (Helo, Mail, Rcpt) when there is one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from minismtp.content import TOO_BIG, ChunkReader, DotReader
from minismtp.events import Event, Helo, Mail, Rcpt
from minismtp.paths import (
    ParameterError,
    PathError,
    UnknownParameter,
    check_mail_params,
    check_rcpt_params,
    parse_path_and_params,
)
from minismtp.replies import (
    BAD_RECIPIENT,
    BAD_SENDER,
    BDAT_SYNTAX,
    BYE,
    DATA_AFTER_BDAT,
    DATA_GO_AHEAD,
    DUPLICATE_RECIPIENT,
    EXPN_REPLY,
    HELO_SYNTAX,
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
    TOO_MANY_RECIPIENTS,
    UNRECOGNIZED,
    UNSUPPORTED_PARAMETER,
    VRFY_REPLY,
    VRFY_SYNTAX,
    encoded,
)
from minismtp.states import BDAT, CLOSED, DATA, END, START_TLS, TLS, Closed, StartTLS
from minismtp.types import Transaction

if TYPE_CHECKING:
    from minismtp.protocol import Engine

CommandHandler = Callable[["Engine", bytes], Event | StartTLS | Closed | None]


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


def _text(arg: bytes) -> str | None:
    try:
        return arg.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _helo(engine: Engine, arg: bytes, esmtp: bool) -> Event | Closed | None:
    name = _text(arg.strip(b" "))
    if not name:
        return engine._error(LMTP_LHLO_SYNTAX if engine.lmtp else HELO_SYNTAX)
    keywords = ehlo_keywords(
        engine.limits.max_message_size, engine.tls_available and engine.session.tls is None
    )
    return Helo(engine.session, name, esmtp, keywords if esmtp else ())


def cmd_helo(engine: Engine, arg: bytes) -> Event | Closed | None:
    if engine.lmtp:
        return engine._error(LMTP_NOT_SMTP)
    return _helo(engine, arg, esmtp=False)


def cmd_ehlo(engine: Engine, arg: bytes) -> Event | Closed | None:
    if engine.lmtp:
        return engine._error(LMTP_NOT_SMTP)
    return _helo(engine, arg, esmtp=True)


def cmd_lhlo(engine: Engine, arg: bytes) -> Event | Closed | None:
    """RFC 2033 4.1: LMTP's greeting, EHLO's in all but name (a Helo event, ``esmtp``)."""
    if not engine.lmtp:
        return engine._error(UNRECOGNIZED)
    return _helo(engine, arg, esmtp=True)


def cmd_mail(engine: Engine, arg: bytes) -> Event | Closed | None:
    session = engine.session
    if session.helo_name is None:
        return engine._error(LMTP_NEED_LHLO if engine.lmtp else NEED_HELO)
    if engine.transaction is not None:
        return engine._error(NESTED_MAIL)
    if engine.require_tls and session.tls is None:
        return engine._error(TLS_REQUIRED)
    text = _text(arg)
    if text is None:
        return engine._error(NOT_UTF8)
    ascii_only = arg.isascii()
    try:
        command = parse_path_and_params(text, "FROM:", utf8=not ascii_only)
        if command.postmaster:
            raise PathError("<postmaster> is a recipient")
        params = command.params
        if params:
            if not session.esmtp:
                return engine._error(PARAMS_NEED_EHLO)
            check_mail_params(params)
    except UnknownParameter:
        return engine._error(UNSUPPORTED_PARAMETER)
    except ParameterError:
        return engine._error(MAIL_SYNTAX)
    except PathError:
        return engine._error(MAIL_SYNTAX if text[:5].upper() != "FROM:" else BAD_SENDER)
    if params:
        if not ascii_only and "SMTPUTF8" not in params:
            return engine._error(NEED_SMTPUTF8)
        size = params.get("SIZE")
        if size is not None and int(size) > engine.limits.max_message_size:
            engine._reply(TOO_BIG)
            return None
    elif not ascii_only:
        return engine._error(NEED_SMTPUTF8)
    transaction = Transaction(
        session, command.address, params, max_size=engine.limits.max_message_size
    )
    return Mail(session, transaction, command.address, params)


def cmd_rcpt(engine: Engine, arg: bytes) -> Event | Closed | None:
    transaction = engine.transaction
    if transaction is None:
        return engine._error(NEED_MAIL)
    text = _text(arg)
    if text is None:
        return engine._error(NOT_UTF8)
    utf8 = transaction.smtputf8
    try:
        command = parse_path_and_params(text, "TO:", utf8=utf8)
        if command.address.is_null:
            raise PathError("<> is not a recipient")
        if command.params:
            check_rcpt_params(command.params)
    except UnknownParameter:
        return engine._error(UNSUPPORTED_PARAMETER)
    except ParameterError:
        return engine._error(RCPT_SYNTAX)
    except PathError:
        if not utf8 and not arg.isascii():
            return engine._error(NEED_SMTPUTF8)
        return engine._error(RCPT_SYNTAX if text[:3].upper() != "TO:" else BAD_RECIPIENT)
    address = command.address
    recipients = transaction.rcpt_to
    if recipients:
        key = (address.local_part, address.domain.lower())
        for earlier in recipients:
            if (earlier.local_part, earlier.domain.lower()) == key:
                # Delivered once; in LMTP still owed its own reply after the content
                # (RFC 2033 4.2: one per RCPT that succeeded).
                if engine.lmtp:
                    engine._lmtp_recipients.append(earlier)
                engine._reply(DUPLICATE_RECIPIENT)
                return None
    if len(transaction.rcpt_to) >= engine.limits.max_recipients:
        engine._reply(TOO_MANY_RECIPIENTS)
        return None
    return Rcpt(engine.session, transaction, address, command.params)


def cmd_data(engine: Engine, arg: bytes) -> Event | Closed | None:
    if arg:
        return engine._error(NO_ARGUMENTS)
    transaction = engine.transaction
    if transaction is None:
        return engine._error(NEED_MAIL)
    if engine._chunking:
        return engine._error(DATA_AFTER_BDAT)
    if not transaction.rcpt_to:
        return engine._error(LMTP_NEED_RCPT if engine.lmtp else NEED_RCPT)
    engine._reply(DATA_GO_AHEAD)
    limits = engine.limits
    engine._content = DotReader(
        transaction.max_size, limits.max_text_line, limits.accept_bare_line_endings
    )
    engine._state = DATA  # what follows DATA in the command buffer is content now
    return None


def cmd_bdat(engine: Engine, arg: bytes) -> Event | Closed | None:
    size, _, last = arg.partition(b" ")
    if not size.isdigit() or len(size) > 20 or last.upper() not in (b"", b"LAST"):
        return engine._error(BDAT_SYNTAX)
    # RFC 3030 3: a chunk is read in full even when it is refused.
    transaction = engine.transaction
    reader = engine._content
    if not isinstance(reader, ChunkReader) or transaction is None or not transaction.rcpt_to:
        reader = engine._content = ChunkReader(
            transaction.max_size if transaction else 0, engine.limits.accept_bare_line_endings
        )
        if transaction is None:
            reader.failure = NEED_MAIL
        elif not transaction.rcpt_to:
            reader.failure = NEED_RCPT
        else:
            engine._chunking = True
    reader.start(int(size), bool(last))
    engine._state = BDAT
    return None


def cmd_rset(engine: Engine, arg: bytes) -> Event | Closed | None:
    if arg:
        return engine._error(NO_ARGUMENTS)
    engine._reset_transaction()
    return engine._junk_command(OK)


def cmd_noop(engine: Engine, arg: bytes) -> Event | Closed | None:
    return engine._junk_command(OK)


def cmd_vrfy(engine: Engine, arg: bytes) -> Event | Closed | None:
    if not arg.strip():
        return engine._error(VRFY_SYNTAX)
    return engine._junk_command(VRFY_REPLY)


def cmd_expn(engine: Engine, arg: bytes) -> Event | Closed | None:
    return engine._junk_command(EXPN_REPLY)


def cmd_help(engine: Engine, arg: bytes) -> Event | Closed | None:
    greetings = "LHLO" if engine.lmtp else "HELO EHLO"
    verbs = f"{greetings} MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
    if engine.tls_available and engine.session.tls is None:
        verbs += " STARTTLS"
    return engine._junk_command(encoded(214, "2.0.0", f"Commands: {verbs}"))


def cmd_quit(engine: Engine, arg: bytes) -> Event | Closed | None:
    if arg:
        return engine._error(NO_ARGUMENTS)
    engine._reply(BYE)
    engine._reset_transaction()
    engine._state = CLOSED
    return END


def cmd_starttls(engine: Engine, arg: bytes) -> StartTLS | Closed | None:
    if arg:
        return engine._error(NO_ARGUMENTS)
    if not engine.tls_available:
        return engine._error(TLS_UNAVAILABLE)
    if engine.session.tls is not None:
        return engine._error(TLS_ACTIVE)
    engine._reply(TLS_GO_AHEAD)
    # Whatever the client pipelined after STARTTLS came in the clear: drop it unread.
    engine._buf, engine._pos = b"", 0
    engine._state = TLS
    return START_TLS


#: The handler of each verb: ``handler(engine, arg)`` queues replies, moves the engine on,
#: and returns an App event, StartTLS, Closed, or None (the engine goes on with the next
#: command).
COMMANDS: dict[bytes, CommandHandler] = {
    b"HELO": cmd_helo,
    b"EHLO": cmd_ehlo,
    b"LHLO": cmd_lhlo,
    b"MAIL": cmd_mail,
    b"RCPT": cmd_rcpt,
    b"DATA": cmd_data,
    b"BDAT": cmd_bdat,
    b"RSET": cmd_rset,
    b"NOOP": cmd_noop,
    b"VRFY": cmd_vrfy,
    b"EXPN": cmd_expn,
    b"HELP": cmd_help,
    b"QUIT": cmd_quit,
    b"STARTTLS": cmd_starttls,
}
