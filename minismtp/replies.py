"""The replies minismtp sends on its own, without asking the App.

The engine's, for what the RFCs decide in the dialogue (syntax, command sequence, limits), are
bytes, encoded once: the engine queues them as they are (:mod:`minismtp.protocol`,
:mod:`minismtp.commands`, :mod:`minismtp.content`).

The server layer's are :class:`~minismtp.types.Reply` objects: they end a connection for
reasons only the server knows (its clocks, its limits, a shutdown). One module, so the
lifecycle (:mod:`minismtp.server`), the connection driver (:mod:`minismtp.connection`) and the
wires' accept paths share one copy.
"""

from __future__ import annotations

from minismtp.types import Reply


def encoded(code: int, status: str | None, text: str) -> bytes:
    """A reply as the engine sends it."""
    return bytes(Reply(code, status, text))


# -- the engine's -------------------------------------------------------------------------------

OK = encoded(250, "2.0.0", "OK")
DATA_GO_AHEAD = encoded(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = encoded(221, "2.0.0", "Bye")
TLS_GO_AHEAD = encoded(220, "2.0.0", "Ready to start TLS")
VRFY_REPLY = encoded(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_REPLY = encoded(502, "5.5.1", "EXPN not supported")
UNRECOGNIZED = encoded(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = encoded(500, "5.5.2", "Line too long")
BARE_LINE_END_IN_COMMAND = encoded(500, "5.5.2", "Syntax error, bare CR or LF in command line")
NOT_UTF8 = encoded(500, "5.5.2", "Syntax error, invalid characters in command")
NO_ARGUMENTS = encoded(501, "5.5.4", "Syntax error, no parameters allowed")
HELO_SYNTAX = encoded(501, "5.5.4", "Syntax: HELO/EHLO domain")
MAIL_SYNTAX = encoded(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = encoded(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
BAD_SENDER = encoded(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = encoded(501, "5.1.3", "Bad recipient address syntax")
VRFY_SYNTAX = encoded(501, "5.5.4", "Syntax: VRFY address")
BDAT_SYNTAX = encoded(501, "5.5.4", "Syntax: BDAT size [LAST]")
NEED_HELO = encoded(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = encoded(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = encoded(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = encoded(554, "5.5.1", "Error: no valid recipients")
# RFC 2033 4.2: in LMTP, DATA without a successful RCPT MUST fail with 503.
LMTP_NEED_RCPT = encoded(503, "5.5.1", "Error: no valid recipients")
LMTP_NEED_LHLO = encoded(503, "5.5.1", "Error: send LHLO first")
LMTP_LHLO_SYNTAX = encoded(501, "5.5.4", "Syntax: LHLO domain")
# RFC 2033 4.1: an LMTP server does not answer HELO or EHLO as SMTP would.
LMTP_NOT_SMTP = encoded(500, "5.5.1", "Error: this is an LMTP server, send LHLO")
DUPLICATE_RECIPIENT = encoded(250, "2.1.5", "OK (duplicate recipient)")
DATA_AFTER_BDAT = encoded(503, "5.5.1", "Error: DATA not allowed after BDAT")
TLS_ACTIVE = encoded(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = encoded(502, "5.5.1", "Error: STARTTLS not available")
TLS_REQUIRED = encoded(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_SMTPUTF8 = encoded(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
PARAMS_NEED_EHLO = encoded(555, "5.5.4", "Parameters need EHLO")
TOO_MANY_RECIPIENTS = encoded(452, "4.5.3", "Too many recipients")
TOO_MANY_ERRORS = encoded(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_JUNK = encoded(421, "4.7.0", "Too many commands without a message, closing connection")
UNSUPPORTED_PARAMETER = encoded(555, "5.5.4", "Unsupported parameter")

# -- the server layer's -------------------------------------------------------------------------

#: The answer to a hook or middleware that raised, and to a failed hand-over. The text is
#: generic on purpose: an exception's text may hold anything, and the client sees the reply.
LOCAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: local error in processing")

IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
DATA_TOO_SLOW = Reply(421, "4.4.2", "Data rate too low, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Server shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address")
TALKED_FIRST = Reply(554, "5.5.1", "Protocol error: talked before greeting")

__all__ = [
    "DATA_TOO_SLOW",
    "IDLE_TIMEOUT",
    "LOCAL_ERROR",
    "SESSION_TOO_LONG",
    "SHUTTING_DOWN",
    "TALKED_FIRST",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_FROM_ADDRESS",
]
