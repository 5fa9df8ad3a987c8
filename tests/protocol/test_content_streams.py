"""Content streams out of the engine in DataChunk events (RFC 5321 4.1.1.4, RFC 3030), bounded,
before the Data event; a refused chunk refuses the message at the end of its data."""

from __future__ import annotations

import pytest

from minismtp.content import ChunkReader, DotReader
from minismtp.events import Data, DataChunk, Event
from minismtp.protocol import MAX_CHUNK, NEED_DATA, Engine, Limits
from minismtp.types import Reply, Session
from tests.helpers.engine_driver import drive

E = b"EHLO client.example\r\n"
TX = E + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
OK = "250 2.0.0"
HEAD = ["250", "250 2.1.0", "250 2.1.5"]
VIRUS = Reply(554, "5.7.0", "Virus found")


def kinds(events: list[Event]) -> list[str]:
    return [type(event).__name__ for event in events[4:]]  # after Connect, EHLO, MAIL, RCPT


def refuse_chunks_with(needle: bytes, reply: Reply = VIRUS) -> object:
    def respond(event: Event) -> Reply | None:
        if isinstance(event, DataChunk) and needle in bytes(event.chunk):
            return reply
        return None

    return respond


# (name, wire, expected DataChunk/Data sequence, replies after the 354 or the BDAT)
ROWS = [
    (
        "4.1.1.4 one read: one chunk, then Data",
        TX + b"DATA\r\nSubject: a\r\n\r\nb\r\n.\r\n",
        ["DataChunk", "Data"],
    ),
    ("4.1.1.4 an empty message: one empty chunk", TX + b"DATA\r\n.\r\n", ["DataChunk", "Data"]),
    (
        "RFC 3030 two chunks",
        TX + b"BDAT 3\r\nabcBDAT 2 LAST\r\nde",
        ["DataChunk", "DataChunk", "Data"],
    ),
    ("RFC 3030 BDAT 0 LAST alone: one empty chunk", TX + b"BDAT 0 LAST\r\n", ["DataChunk", "Data"]),
    ("RFC 1870 too big: no Data", TX + b"DATA\r\n" + b"x" * 200 + b"\r\n.\r\n", []),
]


@pytest.mark.parametrize(("wire", "expected"), [pytest.param(w, e, id=n) for n, w, e in ROWS])
def test_chunk_events(wire: bytes, expected: list[str]) -> None:
    run = drive(wire, limits=Limits(max_message_size=100))
    assert kinds(run.events) == expected


def test_chunks_join_to_the_content_and_come_before_data() -> None:
    body = b"".join(b"line %d\r\n.dot %d\r\n" % (i, i) for i in range(5000))
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    wire = TX + b"DATA\r\n" + stuffed + b".\r\nQUIT\r\n"
    run = drive([wire[i : i + 4096] for i in range(0, len(wire), 4096)])
    assert run.messages == [body]
    assert kinds(run.events)[-1] == "Data"
    assert run.codes == [*HEAD, "354", OK, "221 2.0.0"]


def test_a_large_read_is_handed_on_in_bounded_chunks() -> None:
    """A driver may feed a whole 3 MB message at once: the chunks stay at most MAX_CHUNK."""
    body = (b"y" * 78 + b"\r\n") * 40_000
    run = drive(
        TX + b"DATA\r\n" + body + b".\r\n" + TX[len(E) :] + b"BDAT %d LAST\r\n" % len(body) + body
    )
    chunks = [event for event in run.events if isinstance(event, DataChunk)]
    assert all(0 < len(event.chunk) <= MAX_CHUNK for event in chunks)
    assert len(chunks) >= 2 * len(body) // MAX_CHUNK
    assert run.messages == [body, body]


@pytest.mark.parametrize(
    "reads", [1, 7, 1000], ids=["one read", "7-octet reads", "1000-octet reads"]
)
def test_a_refused_chunk_refuses_the_message_at_its_end_and_the_session_goes_on(reads: int) -> None:
    """The reply to a refused chunk answers the end of data; the rest is read, dropped, and
    never taken for commands; the next transaction is served."""
    content = b"Subject: x\r\n\r\n" + b"clean\r\n" * 2000 + b"EICAR\r\nMAIL FROM:<x@y.z>\r\n" * 3
    wire = TX + b"DATA\r\n" + content + b".\r\nNOOP\r\n" + TX[len(E) :] + b"DATA\r\nok\r\n.\r\n"
    pieces = [wire] if reads == 1 else [wire[i : i + reads] for i in range(0, len(wire), reads)]
    run = drive(pieces, respond=refuse_chunks_with(b"EICAR"))  # type: ignore[arg-type]
    assert run.codes == [
        *HEAD,
        "354",
        "554 5.7.0",
        "250 2.0.0",
        "250 2.1.0",
        "250 2.1.5",
        "354",
        OK,
    ]
    assert run.messages == [b"ok\r\n"]
    assert [t.reply_code for t in run.engine.finished] == [554, 250]


def test_no_chunk_after_a_refused_one() -> None:
    content = b"x" * 70 + b"\r\n"
    run = drive(
        [TX + b"DATA\r\n", content * 100, content * 100, b".\r\n"],
        respond=lambda e: VIRUS if isinstance(e, DataChunk) else None,
    )
    assert kinds(run.events) == ["DataChunk"]
    assert run.codes[-1] == "554 5.7.0"


def test_a_refused_bdat_chunk_is_answered_at_its_end_and_fails_the_transaction() -> None:
    """RFC 3030 3: a failed chunk fails the transaction; the next BDAT has none (503)."""
    wire = TX + b"BDAT 10\r\n0123EICAR BDAT 3 LAST\r\nabcNOOP\r\n"
    run = drive(wire, respond=refuse_chunks_with(b"EICAR"))  # type: ignore[arg-type]
    assert run.codes == [*HEAD, "554 5.7.0", "503 5.5.1", "250 2.0.0"]
    assert not any(isinstance(event, Data) for event in run.events)


def test_a_reply_without_status_to_a_chunk_gets_its_class_status() -> None:
    run = drive(
        TX + b"DATA\r\nx\r\n.\r\n",
        respond=lambda e: Reply(452, None, "Full") if isinstance(e, DataChunk) else None,
    )
    assert run.replies[-1] == "452 4.0.0 Full"


def test_a_421_to_a_chunk_closes_the_session() -> None:
    run = drive(
        TX + b"DATA\r\nx\r\n.\r\nNOOP\r\n",
        respond=lambda e: Reply(421, "4.3.2", "Bye") if isinstance(e, DataChunk) else None,
    )
    assert run.closed and "NOOP" not in run.out.decode()


@pytest.mark.parametrize("bdat", [False, True], ids=["DATA", "BDAT"])
def test_a_16_mb_line_without_a_line_limit_streams_with_bounded_memory(bdat: bool) -> None:
    """RFC 5321 4.5.3.1.6 lets a server lift the line limit; then a line that goes on must be
    settled as it comes (held, each read would join and scan it again: quadratic)."""
    limits = Limits(max_text_line=0, max_message_size=64 * 1024 * 1024)
    engine = Engine(Session(), limits)
    line = b"z" * 16 * 1024 * 1024
    read = 64 * 1024
    if bdat:
        commands = TX + b"BDAT %d LAST\r\n" % (len(line) + 2)
    else:
        commands = TX + b"DATA\r\n"
    reads = [commands] + [line[i : i + read] for i in range(0, len(line), read)]
    reads.append(b"\r\n" if bdat else b"\r\n.\r\n")
    received = 0
    held = 0
    for data in reads:
        engine.receive_data(data)
        while (event := engine.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if isinstance(event, DataChunk):
                received += len(event.chunk)
            engine.respond(
                Reply(250, None, "ok")
                if not isinstance(event, Data)
                else Reply(250, "2.0.0", "queued")
            )
        held = max(held, engine.buffered)
    assert received == len(line) + 2
    assert held <= 2 * read + 16 * 1024
    assert engine.data_to_send().endswith(b"250 2.0.0 queued\r\n")


def test_the_readers_declare_their_state() -> None:
    """The anti-smuggling rules read on their own: each reader is fed bytes and says where the
    commands go on; nothing of the engine is needed."""
    dots = DotReader(max_size=1000)
    assert dots.feed(b"a\r\n.\r\nNOOP\r\n", 0) == (b"\r\na\r\n.\r\nNOOP\r\n", 8)
    assert b"".join(map(bytes, dots.pieces)) == b"a\r\n" and dots.failure is None
    smuggled = DotReader(max_size=1000)
    assert smuggled.feed(b"a\n.\nMAIL FROM:<x@y.z>\r\n", 0) is None  # a bare LF ends nothing
    assert smuggled.failure is not None and smuggled.failure.startswith(b"550 5.5.2")
    chunk = ChunkReader(max_size=1000)
    chunk.start(5, last=True)
    assert chunk.feed(b"ab\r\ncNOOP\r\n", 0) == 5
    assert chunk.remaining == 0 and b"".join(map(bytes, chunk.pieces)) == b"ab\r\nc"


def test_an_end_of_data_split_inside_its_last_crlf_by_a_large_read() -> None:
    """RFC 5321 4.1.1.4: the reads end after "<CRLF>.<CR>" and the next, a large one (past
    the small-read path), starts with the "<LF>": the commands go on right after it, not
    after the next read's first line (the MAIL that follows used to be skipped)."""
    body = b"Subject: a\r\n\r\n" + (b"y" * 78 + b"\r\n") * 300  # 24 KB: a large read
    message = TX + b"DATA\r\n" + body + b".\r\n"
    second = b"MAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n" + body
    wire = message + second + b".\r\nQUIT\r\n"
    split = len(message) - 1  # between the CR and the LF of the first end of data
    run = drive([wire[:split], wire[split:]])
    assert run.messages == [body, body]
    assert run.codes == [*HEAD, "354", OK, "250 2.1.0", "250 2.1.5", "354", OK, "221 2.0.0"]
