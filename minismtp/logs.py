"""Logging for ``minismtp run``: one line per transaction must not cost a system call each.

The server writes one INFO line per mail transaction. Written through a plain
``StreamHandler``, that line cost a quarter of the server's whole CPU time per 1 KB message
(tests/bench/README.md), most of it the ``write()`` to stderr per line.

So the CLI logs through :class:`BatchingHandler`, which formats each record at once and
writes the lines out in batches: at most ``interval`` seconds late, at once for a WARNING or
worse, and when the process exits (``logging.shutdown``). A crash that kills the process
outright (SIGKILL, a segfault) loses at most the last ``interval`` seconds of INFO lines.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from minismtp.types import Session, Transaction

# "000" to "999": indexing costs a fifth of formatting with ":03d", once per line.
_MILLISECONDS = tuple(f"{ms:03d}" for ms in range(1000))


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def field(text: str | None) -> str:
    """``text`` as one field of a log line: what the client chose (a HELO name, an address)
    must not write control characters into the operator's terminal, nor a space that would
    split the field; each such character, and the backslash, is written ``\\xNN``. Printable
    non-ASCII (an SMTPUTF8 address) is kept. None is ``-``."""
    if text is None:
        return "-"
    if text.isprintable() and " " not in text and "\\" not in text:
        return text  # nearly always: three scans in C
    return "".join(
        [_escape(c) if c == " " or c == "\\" or not c.isprintable() else c for c in text]
    )


def quoted(text: str) -> str:
    """``text`` (free text, a reply's) as a log field in double quotes, escaped as
    :func:`field` does but with its spaces kept."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    escaped = [_escape(c) if c in '"\\' or not c.isprintable() else c for c in text]
    return '"' + "".join(escaped) + '"'


def transaction_line(session: Session, transaction: Transaction, duration: float) -> str:
    """The server's INFO line for one mail transaction, however it ended.

    ``session <id> from <peer> helo=<name> from=<sender> to=<recipients> size=<octets>
    reply=<code> id=<message id> duration=<seconds>s``, with ``refused=<address>:<code>,...``
    after ``to=`` for each recipient refused, ``outcomes=<address>:<code>,...`` for each
    answered on its own after the data (``transaction.recipient_replies``), and
    ``reason="<status> <text>"`` after
    ``reply=`` when the content was refused. ``size`` of a refused message is what it had
    reached when it was refused.
    """
    code = transaction.reply_code
    recipients = ",".join([f"<{field(str(rcpt))}>" for rcpt in transaction.rcpt_to])
    line = (
        f"session {session.id} from {session.peer[0]} helo={field(session.helo_name)} "
        f"from=<{field(str(transaction.mail_from))}> to={recipients}"
    )
    refused = transaction.refused_rcpts
    if refused:
        line += " refused=" + ",".join(
            [f"<{field(str(address))}>:{reply.code}" for address, reply in refused]
        )
    outcomes = transaction.recipient_replies
    if outcomes:
        # Answered on their own after the data: in LMTP each got its reply, SMTP folded them.
        line += " outcomes=" + ",".join(
            [f"<{field(str(address))}>:{reply.code}" for address, reply in outcomes.items()]
        )
    line += f" size={transaction.size} reply={code if code is not None else 'abandoned'}"
    if transaction.refusal is not None:
        line += f" reason={quoted(transaction.refusal)}"
    return f"{line} id={transaction.message_id or '-'} duration={duration:.3f}s"


class Formatter(logging.Formatter):
    """``<date> <LEVEL> <logger>: <message>``, the date formatted once per second.

    A record without a traceback is formatted in one f-string rather than through the
    general ``%``-style machinery: this runs once per transaction.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._date = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = date = self.formatTime(record)
        return self.line(date, record.levelname, record.name, message)

    @staticmethod
    def line(date: str, level: str, name: str, message: str) -> str:
        """The one layout of a line, for records and for :class:`InfoLine`'s lines alike."""
        return f"{date} {level} {name}: {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.date(record.created, record.msecs)

    def date(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._date = time.strftime("%Y-%m-%d %H:%M:%S,", self.converter(second))
            self._second = second
        return self._date + _MILLISECONDS[int(msecs) % 1000]


class BatchingHandler(logging.Handler):
    """Write formatted lines to ``stream`` in batches (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.2) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        # A deque: appends need no lock (only flush() takes lines out, under the lock).
        self._lines: deque[str] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._flusher = threading.Thread(
            target=self._flush_every_interval, name="minismtp-log-flusher", daemon=True
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()  # problems show at once, with what led to them

    def info_line(self, name: str, message: str, created: float) -> bool:
        """Add the INFO line ``message`` of logger ``name`` without a LogRecord, formatted as
        :class:`Formatter` would; False if this handler would not write it so (another
        formatter, a filter, a level above INFO)."""
        formatter = self.formatter
        if type(formatter) is not Formatter or self.filters or self.level > logging.INFO:
            return False
        date = formatter.date(created, (created - int(created)) * 1000)
        self._lines.append(formatter.line(date, "INFO", name, message))
        return True

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            queued = self._lines
            lines = [queued.popleft() for _ in range(len(queued))]
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone (closed pipe): nothing left to tell anyone

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()

    def _flush_every_interval(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self.flush()


class InfoLine:
    """The INFO line of one call site (the server's per-transaction line), logged cheaply.

    ``logger.info(...)`` builds each record from scratch: it walks the stack for the caller's
    file and line, looks up the thread and process (a ``getpid()`` system call), splits the
    file name. For a line logged once per transaction from one place, all of that is the same
    every time: it is taken once, from a real record, and each line copies it, setting only
    the message and the time. Handlers and formatters see an ordinary, complete LogRecord.

    When the line would reach the CLI's :class:`BatchingHandler` alone (the usual case for
    ``minismtp run``), no record is made at all: the handler takes the formatted line, which
    costs a quarter of the copied record's way through ``logger.handle``.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._template: dict[str, Any] | None = None

    def __call__(self, message: str) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        now = time.time()
        # What the CLI sets up: one BatchingHandler, no filters. The line goes straight to it.
        handler = _sole_batching_handler(logger)
        if handler is not None and handler.info_line(logger.name, message, now):
            return
        template = self._template
        if template is None:
            caller = sys._getframe(1).f_code
            record = logger.makeRecord(
                logger.name, logging.INFO, caller.co_filename, 0, "", (), None, caller.co_name
            )
            template = self._template = record.__dict__
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        fields["msg"] = message
        fields["created"] = now
        fields["msecs"] = (now - int(now)) * 1000
        fields["relativeCreated"] = (now - logging._startTime) * 1000  # type: ignore[attr-defined]
        logger.handle(record)


def _sole_batching_handler(logger: logging.Logger) -> BatchingHandler | None:
    """The handler a record of ``logger`` would reach, if it is the only one, is a
    BatchingHandler and no filter on the way could stop or change the record."""
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or type(handler) is not BatchingHandler:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


def configure(level: str) -> None:
    """The CLI's logging: ``level`` and above to stderr, through a :class:`BatchingHandler`."""
    root = logging.getLogger()
    if root.handlers:
        return  # configured already (a sitecustomize, a test harness): as basicConfig does
    handler = BatchingHandler()
    handler.setFormatter(Formatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
