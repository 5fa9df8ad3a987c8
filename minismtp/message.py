"""An accepted message: its envelope, and its content in a spool (memory or a file).

The content is never joined whole by the framework: it streams from the engine into the
message's :class:`~minismtp.spool.Spool` (our ``Received:`` header first), and is read from
there with :meth:`Message.open`, :meth:`Message.chunks`, :attr:`Message.headers` -- or whole,
with :attr:`Message.data`, which loads it.

Lifetime. Until the App hands a message over, the transaction owns it: every way a transaction
ends without a hand-over (RSET, QUIT, a lost connection, a refusal, an exception, a timeout, a
shutdown) closes it, and its spool file is removed. Once handed over:

- to a Maildir: the spool file *is* the stored file (renamed into ``new/``); closing the
  message never removes it;
- to the channel: the consumer owns the message. ``with message:`` (or ``message.close()``)
  removes its spool file when the consumer is done; a message nobody closes is cleaned up
  when it is garbage collected.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import BinaryIO

import anyio.to_thread
import attrs

from minismtp.ids import new_id
from minismtp.spool import Piece, Spool
from minismtp.types import Address, Reply, TLSInfo

__all__ = ["Message"]

#: The most of a header section that is parsed or edited; a longer one is cut at a field.
MAX_HEADER_SECTION = 1024 * 1024
CHUNK_SIZE = 256 * 1024
_FIELD_START = re.compile(rb"\r\n(?![ \t])")  # a line that does not continue a folded field
_HEADER_FIELD = re.compile(r"[!-9;-~]+")  # RFC 5322 2.2 field-name
_NO_REPLIES: Mapping[Address, Reply] = MappingProxyType({})  # shared: most messages have none


@attrs.define(eq=False)
class Message:
    """An accepted message, as handed to stores, ``on_message`` consumers and ``app.messages``.

    The envelope: ``id``, ``mail_from``, ``rcpt_to``, ``peer``, ``helo_name``, ``tls``,
    ``received_at``, ``mail_params``, ``rcpt_params``. The content (see the module docstring
    for who owns it): :attr:`size`, :meth:`open`, :meth:`chunks`, :attr:`path`,
    :attr:`headers`, :attr:`data`, :attr:`original`. Build one yourself with
    :meth:`from_bytes` or :meth:`from_file`.
    """

    id: str
    mail_from: Address
    rcpt_to: tuple[Address, ...]
    peer: tuple[str, int]
    helo_name: str | None
    tls: TLSInfo | None
    received_at: float
    mail_params: dict[str, str | None] = attrs.field(factory=dict)
    rcpt_params: tuple[dict[str, str | None], ...] = ()
    _spool: Spool = attrs.field(factory=Spool, alias="spool", repr=False)
    #: Octets in front of the client's content: our trace header, and any prepended field.
    trace_length: int = 0
    _size: int = attrs.field(default=-1, alias="size", repr=False)
    _head_end: int = attrs.field(default=-1, init=False, repr=False)
    _headers: email.message.EmailMessage | None = attrs.field(default=None, init=False, repr=False)
    # Edits not yet written into the spool (most messages have none: no list, no set for them).
    _prepended: tuple[bytes, ...] = attrs.field(default=(), init=False, repr=False)
    _dropped: frozenset[tuple[int, int]] = attrs.field(default=frozenset(), init=False, repr=False)
    #: Recipients whose outcome differs from the message's, by Address: those refused after
    #: the data (``rcpt_to`` then holds only the others), or answered with a Reply of their
    #: own. In SMTP the sender was told ``250`` for all: a refusal here is yours to report.
    recipient_replies: Mapping[Address, Reply] = attrs.field(default=_NO_REPLIES, init=False)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        trace_length: int = 0,
        id: str | None = None,  # the field's name
        mail_from: Address | None = None,
        rcpt_to: tuple[Address, ...] = (),
        peer: tuple[str, int] = ("", 0),
        helo_name: str | None = None,
        tls: TLSInfo | None = None,
        received_at: float | None = None,
        mail_params: dict[str, str | None] | None = None,
        rcpt_params: tuple[dict[str, str | None], ...] = (),
    ) -> Message:
        """A message over ``data`` (held in memory), whose first ``trace_length`` octets are
        trace fields put in front of the client's content (ours, when stored earlier)."""
        spool = Spool.from_bytes(data)
        return cls._over(
            spool, trace_length, id, mail_from, rcpt_to, peer, helo_name, tls,
            received_at, mail_params, rcpt_params,
        )  # fmt: skip

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        owned: bool = False,
        trace_length: int = 0,
        id: str | None = None,
        mail_from: Address | None = None,
        rcpt_to: tuple[Address, ...] = (),
        peer: tuple[str, int] = ("", 0),
        helo_name: str | None = None,
        tls: TLSInfo | None = None,
        received_at: float | None = None,
        mail_params: dict[str, str | None] | None = None,
        rcpt_params: tuple[dict[str, str | None], ...] = (),
    ) -> Message:
        """A message over the file at ``path``, which is read, not loaded. ``owned``: the
        message removes the file when it is closed (or garbage collected)."""
        spool = Spool.from_file(path, owned=owned)
        return cls._over(
            spool, trace_length, id, mail_from, rcpt_to, peer, helo_name, tls,
            received_at, mail_params, rcpt_params,
        )  # fmt: skip

    @classmethod
    def _over(
        cls,
        spool: Spool,
        trace_length: int,
        id: str | None,
        mail_from: Address | None,
        rcpt_to: tuple[Address, ...],
        peer: tuple[str, int],
        helo_name: str | None,
        tls: TLSInfo | None,
        received_at: float | None,
        mail_params: dict[str, str | None] | None,
        rcpt_params: tuple[dict[str, str | None], ...],
    ) -> Message:
        # The defaults of from_bytes and from_file, filled in once.
        return cls(
            id or new_id(),
            mail_from or Address.null(),
            tuple(rcpt_to),
            peer,
            helo_name,
            tls,
            time.time() if received_at is None else received_at,
            mail_params or {},
            tuple(rcpt_params),
            spool,
            trace_length,
        )

    def write(self, piece: Piece) -> None:
        """Append content as it streams in (the App does, for each DataChunk)."""
        self._spool.write(piece)

    # -- reading ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Octets of the content as the client sent it (dot-unstuffed), without our headers."""
        if self._size < 0:
            return self._spool.size - self.trace_length
        return self._size

    def open(self) -> BinaryIO:
        """A new binary file object, seekable, over the whole message with our trace header;
        close it when done (``with message.open() as f:``). May be called many times."""
        self._apply_edits()
        return self._spool.open()

    async def chunks(self, size: int = CHUNK_SIZE) -> AsyncIterator[bytes | memoryview]:
        """``async for chunk in message.chunks():`` the whole message (with our trace header)
        in pieces of at most ``size`` octets; a file is read in a worker thread."""
        self._apply_edits()
        spool = self._spool
        if spool.in_memory:
            for block in spool.blocks(size):
                yield block
            return
        for start in range(0, spool.size, size):
            yield await anyio.to_thread.run_sync(spool.read, start, start + size)

    @property
    def path(self) -> Path | None:
        """The file that holds the message (our trace header first), if there is one: the spool
        file of a large message, or where a Maildir stored it. None for one in memory."""
        self._apply_edits()
        return self._spool.path

    @property
    def data(self) -> bytes:
        """The whole message, our ``Received:`` header first, as bytes: loads a large message
        whole into memory (prefer :meth:`open` or :meth:`chunks` for those)."""
        self._apply_edits()
        return self._spool.read_all()

    @property
    def original(self) -> bytes:
        """The content as the client sent it, without our headers (a copy; loads it)."""
        self._apply_edits()
        return self._spool.read(self.trace_length, self._spool.size)

    @property
    def headers(self) -> email.message.EmailMessage:
        """The header section (ours first), parsed by the standard library's ``email``
        package (``policy.default``) when first asked for; the body is not read."""
        headers = self._headers
        if headers is None:
            head = b"".join((*self._prepended, self._client_head()))
            parser = email.parser.BytesHeaderParser(policy=email.policy.default)
            headers = parser.parsebytes(head)
            assert isinstance(headers, email.message.EmailMessage)
            self._headers = headers
        return headers

    # -- editing, before the hand-over ------------------------------------------------------

    def prepend_header(self, name: str, value: str) -> None:
        """Put the field ``name: value`` in front of the message (above our trace header), as
        RFC 8601 asks of ``Authentication-Results:``. Folded lines in ``value`` must start
        with a space or a tab. On a large message the edit costs one copy on disk, when the
        message is next read or stored."""
        if not _HEADER_FIELD.fullmatch(name):
            raise ValueError(f"not a header field name: {name!r}")
        lines = value.replace("\r\n", "\n").split("\n")
        if any("\r" in line or (i and line[:1] not in (" ", "\t")) for i, line in enumerate(lines)):
            # A line end that does not fold would end the field, and start one of the client's.
            raise ValueError(f"a folded line of {name} must start with a space or a tab")
        text = "\r\n".join(lines)
        self._freeze_size()
        self._prepended = (f"{name}: {text}\r\n".encode(), *self._prepended)
        self._headers = None

    def drop_headers(self, predicate: Callable[[str, str], bool]) -> int:
        """Remove from the client's header section each field for which ``predicate(name,
        value)`` is true (the value unfolded, without the leading space); returns how many.
        Our trace header and prepended fields are not looked at."""
        head_start = self.trace_length
        dropped = 0
        for start, end, name, value in _fields(self._raw_head()[head_start:]):
            span = (head_start + start, head_start + end)
            if span not in self._dropped and predicate(name, value):
                self._freeze_size()
                self._dropped |= {span}
                dropped += 1
        if dropped:
            self._headers = None
        return dropped

    def _freeze_size(self) -> None:
        if self._size < 0:
            self._size = self.size

    def _raw_head(self) -> bytes:
        """The spool's head: our trace header and the client's header section, up to (not
        with) the empty line."""
        spool = self._spool
        end = self._head_end
        if end < 0:
            end = self._head_end = _header_end(spool, self.trace_length)
        return spool.read(0, end)

    def _client_head(self) -> bytes:
        """The head, with the fields dropped so far taken out."""
        head = self._raw_head()
        for start, stop in sorted(self._dropped, reverse=True):
            head = head[:start] + head[stop:]
        return head

    def _apply_edits(self) -> None:
        """Write the edits into the spool: the head is replaced, the body is left in place
        (in a file: one copy of it, by the kernel)."""
        if not self._prepended and not self._dropped:
            return
        new_head = b"".join((*self._prepended, self._client_head()))
        self._spool.replace_head(self._head_end, new_head)
        self.trace_length += sum(map(len, self._prepended))
        self._head_end = len(new_head)
        self._prepended = ()
        self._dropped = frozenset()

    # -- lifetime ---------------------------------------------------------------------------

    @property
    def spool(self) -> Spool:
        """Where the content is (for stores)."""
        self._apply_edits()
        return self._spool

    @property
    def closed(self) -> bool:
        return self._spool.closed

    def close(self) -> None:
        """Let go of the content: its memory, and its spool file unless a store has it."""
        self._spool.close()

    def __enter__(self) -> Message:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _header_end(spool: Spool, start: int) -> int:
    """Where the header section that starts at ``start`` ends: after the CRLF of its last
    field (the empty line follows); at most :data:`MAX_HEADER_SECTION` octets on, cut after a
    whole line."""
    if spool.read(start, start + 2) == b"\r\n":
        return start  # no header fields at all
    limit = start + MAX_HEADER_SECTION
    block = 64 * 1024
    pos = start
    while pos < spool.size and pos < limit:
        text = spool.read(max(start, pos - 3), min(pos + block, limit))
        found = text.find(b"\r\n\r\n")
        if found >= 0:
            return max(start, pos - 3) + found + 2
        pos += block
    text = spool.read(start, min(limit, spool.size))
    if len(text) < MAX_HEADER_SECTION:
        return spool.size  # the whole content is a header section
    return start + text.rfind(b"\r\n") + 2 if b"\r\n" in text else start


def _fields(head: bytes) -> list[tuple[int, int, str, str]]:
    """The fields of a header section: (start, end, name, unfolded value) each, with the
    offsets of the field's octets (with its CRLF) in ``head``."""
    fields = []
    starts = [0] + [match.end() for match in _FIELD_START.finditer(head)]
    for start, end in zip(starts, [*starts[1:], len(head)], strict=True):
        raw = head[start:end]
        if not raw.strip():
            continue
        name, colon, value = raw.partition(b":")
        if not colon:
            continue
        text = value.decode("utf-8", "surrogateescape")
        fields.append((start, end, name.decode("ascii", "replace"), _unfold(text)))
    return fields


def _unfold(value: str) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", value).strip(" \t\r\n")
