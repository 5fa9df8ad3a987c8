"""The readers of message content: DATA's dot-stuffed lines and BDAT's counted chunks.

The engine hands every octet after a ``DATA`` or ``BDAT`` command to one of these readers
until the content ends. A reader settles what it has read into :attr:`pieces` (dot-unstuffed,
CRLF line ends), which the engine hands onward as ``DataChunk`` events, and applies the rules
that make SMTP smuggling impossible (RFC 5321 4.1.1.4, 2.3.8; SEC Consult, 2023):

- DATA ends at ``CRLF . CRLF`` and nothing else: a bare LF or bare CR never ends it;
- a CR or LF outside a CRLF refuses the message (``550 5.5.2``), or, with
  ``Limits.accept_bare_line_endings``, is normalised to CRLF -- never turned into an end;
- BDAT content is taken exactly as counted: no dot, no line end inside it ends anything,
  and its line ends are checked by the same rule, across chunk boundaries.

Past a limit (size, line length) or after a refusal the reader goes on reading to the end of
the content but keeps nothing; the engine answers :attr:`failure` there. A reader holds no more
than a line (or the end's first octets) plus what it settled and the engine has not handed on.
"""

from __future__ import annotations

import re

import attrs

from minismtp.replies import encoded

Piece = bytes | memoryview


TOO_BIG = encoded(552, "5.3.4", "Message size exceeds fixed maximum message size")
TEXT_LINE_TOO_LONG = encoded(500, "5.5.2", "Message line too long")
BARE_LINE_END_IN_DATA = encoded(550, "5.5.2", "Message contains bare CR or LF")

_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
# A CR not followed by LF; an LF not preceded by CR; an LF that is bare or starts a line with
# a dot (stuffed, or the end of data). Each pattern starts with one literal octet, which the
# re module finds with a tight scan in C; only where it finds one does it look around. That
# beats counting CRLF, CR and LF on lines of usual length, and loses on very short ones
# (tests/bench/README.md, "Figures behind the server layer's choices").
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_DOT_LINE_OR_BARE_LF = re.compile(rb"\n(?:\.|(?<!\r\n))")
# The re module also finds these literals faster than bytes.find() and bytes.replace() do
# (measured: tests/bench/README.md).
_END_OF_DATA = re.compile(rb"\r\n\.\r\n")
_UNSTUFF = re.compile(rb"\r\n\.")  # a CRLF-dot line start loses its dot
_CRLF = b"\r\n"
# Octets as ints: "13 in line" is a memchr, while b"\r" in line costs ten times as much.
_CR, _LF = ord("\r"), ord("\n")
# Below this, a read is joined to the tail and scanned as one: copying a few KB costs less
# than settling its first line apart (Python's cost per read). Also the length from
# which a line that does not end is settled as it comes (without a line length limit).
_SMALL_READ = 16 * 1024


def _has_bare_line_end(text: bytes) -> bool:
    """Whether ``text`` holds a CR or LF outside a CRLF (most texts: none at all, two memchr)."""
    return (_CR in text or _LF in text) and (
        _BARE_CR.search(text) is not None or _BARE_LF.search(text) is not None
    )


def pieces_have_bare_line_end(pieces: list[Piece]) -> bool:
    """Whether the pieces joined hold a CR or LF outside a CRLF, without joining them: a
    CRLF may be split between two pieces."""
    after_cr = False
    for piece in pieces:
        if piece:
            bare, after_cr = _bare_in_piece(piece, after_cr)
            if bare:
                return True
    return after_cr


def _bare_in_piece(piece: Piece, after_cr: bool) -> tuple[bool, bool]:
    """Whether non-empty ``piece`` holds a bare CR or LF, given that the content before it
    ended with a CR (``after_cr``); and whether it ends with a CR itself (maybe half a CRLF).
    Regular expressions only: ``in`` on a memoryview goes octet by octet in Python."""
    if after_cr != (piece[0] == _LF):  # a CR without its LF, or an LF without its CR
        return True, False
    cr = _BARE_CR.search(piece)
    if cr is not None and cr.start() != len(piece) - 1:  # a CR at the end may be a CRLF's
        return True, False
    # The LF at 0 was checked against the piece before.
    return _BARE_LF.search(piece, 1) is not None, piece[-1] == _CR


@attrs.define(eq=False)
class DotReader:
    """DATA content (RFC 5321 4.1.1.4): the lines up to ``CRLF . CRLF``, dot-unstuffed (4.5.2).

    Each read is scanned a few times in C, whole, never line by line. A read is settled up to
    its last CRLF; the rest, from that CRLF on, waits in the tail. The next read's first line
    is joined to the tail (a copy of a line, not of the read), so that an end of data, a
    stuffed dot or a CRLF split between two reads is seen whole there; the rest of the read is
    settled where it lies.
    """

    max_size: int  # octets of content; past it: 552 5.3.4 (RFC 1870)
    max_text_line: int = 1000  # octets with CRLF (RFC 5321 4.5.3.1.6); 0: no limit
    normalise: bool = False  # bare CR/LF become CRLF instead of refusing the message
    #: Content settled and not yet handed on (the engine empties it).
    pieces: list[Piece] = attrs.field(factory=list)
    size: int = 0  # octets of content settled so far
    failure: bytes | None = None  # the reply, once the content is refused
    # Not yet settled: from the last CRLF on. The content is read as if preceded by a CRLF, so
    # that an empty message (a lone "." line) and a first line starting with a dot need no
    # special case; ``_skip`` octets of that are dropped from the first piece settled.
    _tail: bytes = b"\r\n"
    _skip: int = 2

    @property
    def held(self) -> int:
        """Octets of the client's held here."""
        return len(self._tail) + sum(map(len, self.pieces))

    def feed(self, data: bytes, start: int) -> tuple[bytes, int] | None:
        """Read ``data[start:]``. None: all of it was content; else the end of data was in
        it, and the commands go on at ``(buffer, offset)``."""
        if len(data) - start < _SMALL_READ or (first := data.find(_CRLF, start) + 2) == 1:
            # A small read (a message of a few KB), or one long line: joined to the tail whole.
            where = self._take(b"".join((self._tail, memoryview(data)[start:])), 0)
        else:
            tail = self._tail
            where = self._take(b"".join((tail, memoryview(data)[start:first])), 0)
            if where is not None:  # the read's first line ended the data: commands follow
                # Where in ``data``: not always ``first``, as the end's CRLF may straddle the
                # reads (a tail ending "\r\n.\r", a read starting "\n").
                where = (data, start + where[1] - len(tail))
            else:  # the head ended with the read's first CRLF: the rest starts there
                where = self._take(data, first - 2)
        if where is None:
            self._bound_tail()
        return where

    def refuse(self, reply: bytes) -> None:
        """Refused while streaming: keep reading to the end, but keep nothing."""
        if self.failure is None:
            self.failure = reply
        self.pieces.clear()

    def _take(self, segment: bytes, start: int) -> tuple[bytes, int] | None:
        """Settle ``segment[start:]``, which starts with a CRLF, up to its last CRLF (the new
        tail starts there); or up to the end of data, and say where the commands go on."""
        cut = segment.rfind(_CRLF, start)
        # Most reads of most messages have no line that starts with a dot, and then there is
        # nothing to unstuff and no end of data: the scan for bare LFs tells on the way.
        found = _DOT_LINE_OR_BARE_LF.search(segment, start, cut)
        if found is None:
            self._settle(segment, start, cut, cut + 2, dots=False, bare_lf=False)
            self._tail = segment[cut:]
            return None
        odd = found.start()
        bare_lf = found.end() - odd == 1
        end = _END_OF_DATA.search(segment, odd - 1, cut + 2)
        if end is None:
            self._settle(segment, start, cut, cut + 2, dots=True, bare_lf=bare_lf)
            self._tail = segment[cut:]
            return None
        content_end = end.start() + 2  # up to the CRLF before the dot
        # The LFs before the first dot line were checked on the way to it: when that line is
        # the end of data, there is nothing to unstuff, and no bare LF.
        dots = end.start() + 1 != odd
        self._settle(segment, start, content_end, content_end, dots=dots, bare_lf=bare_lf)
        self._tail = b""
        return segment, end.end()

    def _bound_tail(self) -> None:
        """A line that does not end must not be held whole: past the limits it refuses the
        message, and only what an end of data could still start with is kept of it."""
        tail = self._tail
        max_line = self.max_text_line
        if len(tail) <= max_line + 4:  # the usual case: a line's start (or the end's: CRLF ".")
            return
        if self.failure is None:
            line_start = max(tail.rfind(b"\n", 2) + 1, 2)  # past a bare LF, when normalising
            if max_line and len(tail) - line_start > max_line:
                self.refuse(TEXT_LINE_TOO_LONG)
            elif self.size + len(tail) > self.max_size + 3:  # 3: CRLF, stuffed dot
                self.refuse(TOO_BIG)
            elif max_line or len(tail) < _SMALL_READ:
                return
            else:
                # No line limit: a line that goes on is settled as it comes, all but a CR
                # that may be half of its CRLF. Held, it would be joined to each read and
                # scanned again: a 16 MB line would cost its length squared.
                cut = len(tail) - 1 if tail[-1] == _CR else len(tail)
                self._settle(tail, 0, cut, cut, dots=True, bare_lf=False)
                if self.failure is None:
                    # What follows is the middle of a line: "x" stands for its start (not a
                    # dot, not an end of data) and is dropped from the next piece settled.
                    self._tail = b"\r\nx\r" if cut < len(tail) else b"\r\nx"
                    self._skip = 3
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
        if self.failure is not None:
            return
        max_line = self.max_text_line
        if max_line:
            # Jump from line end to line end a line's maximum at a time: a few Python steps
            # per kilobyte, whatever the lines are. Once less than that is left, the rest
            # are whole lines (the region ends with a line end), each short enough.
            pos = start + 2
            rfind = segment.rfind
            while lines_end - pos > max_line:
                newline = rfind(b"\n", pos, pos + max_line)
                if newline < 0:
                    self.refuse(TEXT_LINE_TOO_LONG)
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
                # Nothing to unstuff: keep a view of the segment, not a copy.
                self._keep(memoryview(segment)[skip:cut])
                return
        # A CR or LF outside a CRLF.
        if not self.normalise:
            self.refuse(BARE_LINE_END_IN_DATA)
            return
        # Unstuff first, so that only real CRLF-dot line starts lose their dot.
        piece = _UNSTUFF.sub(_CRLF, segment[start:cut])
        self._keep(_BARE_LINE_END.sub(_CRLF, piece)[skip - start :])

    def _keep(self, piece: Piece) -> None:
        self.size += len(piece)
        if self.size > self.max_size:
            self.refuse(TOO_BIG)
        elif piece:
            self.pieces.append(piece)


@attrs.define(eq=False)
class ChunkReader:
    """BDAT content (RFC 3030): chunks of exactly the announced number of octets, not parsed.

    One reader serves the chunks of a transaction. Line ends are checked as the octets come,
    a CRLF split between two chunks (or reads) included: a bare CR or LF refuses the message,
    or with ``normalise`` becomes a CRLF (a CR at the end of a piece waits for the next one).
    """

    max_size: int
    normalise: bool = False
    pieces: list[Piece] = attrs.field(factory=list)
    size: int = 0  # octets of content so far
    failure: bytes | None = None
    remaining: int = 0  # octets of the current chunk still to read
    last: bool = False  # the current chunk is the last (BDAT ... LAST)
    _after_cr: bool = False  # the content so far ends with a CR (held back when normalising)

    @property
    def held(self) -> int:
        return sum(map(len, self.pieces))

    def start(self, size: int, last: bool) -> None:
        """A BDAT command announced the next chunk."""
        self.remaining = size
        self.last = last
        if not size and last:
            self._end()

    def feed(self, data: bytes, pos: int) -> int:
        """Take what ``data[pos:]`` holds of the current chunk; the commands go on at the
        offset returned."""
        take = min(self.remaining, len(data) - pos)
        self.remaining -= take
        if self.failure is None and take:
            self._keep(data if take == len(data) else memoryview(data)[pos : pos + take])
        if not self.remaining and self.last:
            self._end()
        return pos + take

    def refuse(self, reply: bytes) -> None:
        if self.failure is None:
            self.failure = reply
        self.pieces.clear()

    def _keep(self, piece: Piece) -> None:
        self.size += len(piece)
        if self.size > self.max_size:
            self.refuse(TOO_BIG)
            return
        bare, ends_with_cr = _bare_in_piece(piece, self._after_cr)
        if not bare:
            if self._after_cr and self.normalise:
                self.pieces.append(b"\r")  # the CR held back: its LF starts this piece
            if ends_with_cr and self.normalise:
                piece = piece[:-1]  # held back: the next piece may start with its LF
            self._after_cr = ends_with_cr
            if piece:
                self.pieces.append(piece)
        elif not self.normalise:
            self.refuse(BARE_LINE_END_IN_DATA)
        else:
            text = bytes(piece)
            if self._after_cr:
                text = b"\r" + text
            self._after_cr = text.endswith(b"\r")
            if self._after_cr:
                text = text[:-1]
            self.pieces.append(_BARE_LINE_END.sub(_CRLF, text))

    def _end(self) -> None:
        """The last chunk is complete: a CR left at the end is bare."""
        if self._after_cr and self.failure is None:
            if self.normalise:
                self.pieces.append(_CRLF)
            else:
                self.refuse(BARE_LINE_END_IN_DATA)
        self._after_cr = False
