"""The engine's content side: what a content reader settles, handed on as events.

While DATA or BDAT content streams in, :meth:`~minismtp.protocol.Engine.next_event` calls
these (plain functions of the engine, as cheap to call as the methods they were): the client's
bytes go to the reader (:mod:`minismtp.content`), its settled pieces come out as ``DataChunk``
events of at most :data:`MAX_CHUNK` octets, and at the end of the content the ``Data`` event
asks the App about the whole message; or the engine answers the reader's refusal itself, once
per accepted recipient in LMTP (RFC 2033 4.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minismtp.content import ChunkReader, DotReader, Piece
from minismtp.events import Data, DataChunk, Event
from minismtp.replies import LMTP_NEED_RCPT, NEED_MAIL, NEED_RCPT, encoded
from minismtp.states import COMMAND, ENDING, NEED_DATA, Closed, NeedData

if TYPE_CHECKING:
    from minismtp.protocol import Engine

#: The largest DataChunk the engine hands on: a larger settled piece (a large read, fed whole)
#: goes out as views of it, so that a spool writes and a hook scans bounded pieces.
MAX_CHUNK = 256 * 1024


def receive_dotted(engine: Engine) -> Event | NeedData | Closed | None:
    """DATA content, through the dot reader (:mod:`minismtp.content`)."""
    reader = engine._content
    assert isinstance(reader, DotReader)
    if reader.pieces:
        return data_chunk(engine, reader.pieces)
    incoming = engine._incoming
    data, start = engine._buf, engine._pos
    if start < len(data):  # sent right after DATA, in the read that carried it
        engine._buf, engine._pos = b"", 0
        if incoming:
            data, start = b"".join((memoryview(data)[start:], *incoming)), 0
    elif incoming:
        data, start = (incoming[0] if len(incoming) == 1 else b"".join(incoming)), 0
    else:
        return engine._lost() if engine._eof else NEED_DATA
    incoming.clear()
    where = reader.feed(data, start)
    if reader.failure is not None:
        engine._release_message()
    if where is not None:  # the end of data: the commands after it, parsed where they lie
        engine._resume_commands(*where)
        engine._state = ENDING
    return None


def receive_chunk(engine: Engine) -> Event | NeedData | Closed | None:
    """A BDAT chunk, through the chunk reader: exactly the announced number of octets."""
    reader = engine._content
    assert isinstance(reader, ChunkReader)
    if reader.pieces:
        return data_chunk(engine, reader.pieces)
    if reader.remaining:
        buf, pos = engine._buf, engine._pos
        if pos < len(buf):
            engine._resume_commands(buf, reader.feed(buf, pos))
            if reader.failure is not None:
                engine._release_message()
            return None
        return engine._lost() if engine._eof else NEED_DATA
    failure = reader.failure
    if failure is NEED_MAIL or failure is NEED_RCPT:
        engine._state = COMMAND
        engine._content = None
        return engine._error(LMTP_NEED_RCPT if failure is NEED_RCPT and engine.lmtp else failure)
    if reader.last or failure is not None:  # a failed chunk fails the transaction too
        engine._state = ENDING
        return None
    engine._state = COMMAND
    engine._reply(encoded(250, "2.0.0", f"{reader.size} octets received"))
    return None


def data_chunk(engine: Engine, pieces: list[Piece]) -> DataChunk:
    """The next settled piece of content, at most :data:`MAX_CHUNK` octets of it."""
    piece = pieces[0]
    if len(piece) > MAX_CHUNK:
        view = memoryview(piece)
        pieces[0] = view[MAX_CHUNK:]
        piece = view[:MAX_CHUNK]
    else:
        del pieces[0]
    transaction = engine.transaction
    assert transaction is not None
    engine._chunks += 1
    return DataChunk(engine.session, transaction, piece)


def end_content(engine: Engine) -> Event | None:
    """The content is complete: its pieces not yet handed on, then the Data event, or the
    refusal."""
    reader = engine._content
    assert reader is not None
    if reader.pieces:
        return data_chunk(engine, reader.pieces)
    failure = reader.failure
    transaction = engine.transaction
    if failure is None and transaction is not None and not engine._chunks:
        # An empty message: one empty chunk all the same, so that the message exists
        # (the App makes it at the first chunk) when Data asks about it.
        engine._chunks = 1
        return DataChunk(engine.session, transaction, b"")
    engine._state = COMMAND
    if failure is not None or transaction is None:
        failure = failure or NEED_MAIL
        if transaction is not None:
            transaction.size = reader.size  # for the log: how far it got
            transaction.refusal = failure[4:].decode("ascii", "replace").rstrip()
        answer_content_failure(engine, failure)
        engine._reset_transaction(int(failure[:3]))
        return None
    transaction.size = reader.size
    return Data(engine.session, transaction)


def answer_content_failure(engine: Engine, reply: bytes) -> None:
    """The engine refused the content (size, line length, bare line ends): in LMTP every
    accepted RCPT is owed that reply at the end of the content (RFC 2033 4.2), in SMTP the
    message is; a BDAT chunk that is not the last is owed one reply whatever the mode."""
    reader = engine._content
    ending = not isinstance(reader, ChunkReader) or reader.last
    owed = len(engine._lmtp_recipients) if engine.lmtp and ending else 1
    engine._out.extend([reply] * max(owed, 1))
