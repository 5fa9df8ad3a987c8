"""Properties of the engine over any input, and the SMTP smuggling attack (SEC Consult, 2023)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minismtp import content
from minismtp.events import Data, Event, Helo, Mail, Rcpt
from minismtp.protocol import Limits
from tests.helpers.engine_driver import Run, drive
from tests.helpers.smtp_input import LIMITS, check_replies, cut, smtpish


@pytest.fixture(scope="module", autouse=True, params=["small reads whole", "every read split"])
def content_path(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every property holds on both ways the engine takes a read of DATA content: joined to
    what the last read left (small reads), or settled where it lies (large ones)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "every read split":
            patch.setattr(content, "_SMALL_READ", 0)
        yield


def summary(event: Event, run: Run) -> tuple[object, ...]:
    if isinstance(event, Helo):
        return ("helo", event.name, event.esmtp)
    if isinstance(event, Mail | Rcpt):
        return (type(event).__name__, str(event.address), tuple(event.params.items()))
    if isinstance(event, Data):
        return ("data", run.content(event), tuple(map(str, event.transaction.rcpt_to)))
    return (type(event).__name__,)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=smtpish, points=st.lists(st.integers(min_value=0), max_size=12))
def test_any_input_any_cut_same_events_valid_replies(data: bytes, points: list[int]) -> None:
    """Never raises; replies are well formed; chunking does not change the outcome.

    (Without TLS: after STARTTLS, what shared the client's write is dropped by design.)
    """
    whole = drive(data, limits=LIMITS)
    pieces = drive(cut(data, points), limits=LIMITS)
    check_replies(whole.out)
    assert pieces.out == whole.out
    assert [summary(e, pieces) for e in pieces.app_events] == [
        summary(e, whole) for e in whole.app_events
    ]


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.binary(min_size=1, max_size=3000), max_size=30))
def test_memory_held_stays_bounded(data: list[bytes]) -> None:
    """Whatever arrives, the engine holds at most a line or a message (at the limits) plus a read."""
    from minismtp.protocol import NEED_DATA, Closed, Engine, StartTLS
    from minismtp.types import Reply, Session

    engine = Engine(Session(), LIMITS)
    prefix = [b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"]
    bound = 2 * LIMITS.max_message_size + LIMITS.max_command_line + 3000
    for chunk in prefix + data:
        engine.receive_data(chunk)
        while True:
            event = engine.next_event()
            if event is NEED_DATA or isinstance(event, Closed | StartTLS):
                break
            engine.respond(Reply(220 if type(event).__name__ == "Connect" else 250, None, "ok"))
        engine.data_to_send()
        assert engine.buffered <= bound
        if isinstance(event, Closed | StartTLS):
            break


TX = b"EHLO x\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
SMUGGLED = (
    b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    b"From: admin@example.com\r\n\r\nsmuggled\r\n"
)
FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=repr)
@pytest.mark.parametrize("normalise", [False, True], ids=["reject", "normalise"])
def test_smtp_smuggling_yields_one_message_or_a_rejection(fake_end: bytes, normalise: bool) -> None:
    """RFC 5321 4.1.1.4: only CRLF.CRLF ends data; a fake end never starts a transaction."""
    data = TX + b"Subject: hi\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\nQUIT\r\n"
    for chunks in ([data], [bytes([b]) for b in data]):
        run = drive(chunks, limits=Limits(accept_bare_line_endings=normalise))
        mails = [e for e in run.events if isinstance(e, Mail)]
        assert [str(m.address) for m in mails] == ["alice@example.org"]
        assert len(run.messages) <= 1
        if normalise:
            assert len(run.messages) == 1 and b"smuggled" in run.messages[0]
        else:
            assert run.messages == [] and "550 5.5.2" in run.replies[-2]


CONTENT_TOKENS = [b"\r\n", b"\r", b"\n", b".", b"..", b"x", b"\r\n.", b"\r\n..", b"\r\n.\r", b".\n"]
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@settings(max_examples=600, deadline=None)
@given(
    text=st.lists(st.sampled_from(CONTENT_TOKENS), max_size=40).map(b"".join),
    points=st.lists(st.integers(min_value=0), max_size=8),
    normalise=st.booleans(),
)
def test_data_content_is_the_text_read_line_by_line(
    text: bytes, points: list[int], normalise: bool
) -> None:
    """RFC 5321 4.1.1.4 and 4.5.2, read the simple way: the content runs to the first
    CRLF.CRLF (counting the CRLF that ended the DATA line), each CRLF "." loses its dot, and a
    CR or LF outside a CRLF refuses the message with 550 (or, normalising, becomes a CRLF)."""
    wire = b"\r\n" + text + b"\r\n.\r\n"
    raw = wire[: wire.find(b"\r\n.\r\n") + 2]  # up to the CRLF before the ending dot
    run = drive(
        cut(TX + text + b"\r\n.\r\nQUIT\r\n", points),
        limits=Limits(accept_bare_line_endings=normalise, max_text_line=0),
    )
    unstuffed = raw.replace(b"\r\n.", b"\r\n")
    if not BARE_CR_OR_LF.search(raw):
        assert run.messages == [unstuffed[2:]]
    elif normalise:
        assert run.messages == [re.sub(rb"\r\n|\r|\n", b"\r\n", unstuffed)[2:]]
    else:
        assert run.messages == [] and "550 5.5.2" in run.codes


LINE_LIMITS = Limits(max_text_line=20, max_message_size=100_000)


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=24), min_size=1, max_size=30),
    points=st.lists(st.integers(min_value=0), max_size=8),
    dotted=st.booleans(),
)
def test_text_line_limit_whatever_the_reads(
    lengths: list[int], points: list[int], dotted: bool
) -> None:
    """RFC 5321 4.5.3.1.6: a message is refused (500 5.5.2) if and only if one of its lines,
    with its CRLF, is longer than the limit, however the reads cut it."""
    lines = [(b".." if dotted else b"") + b"y" * n + b"\r\n" for n in lengths]  # wire lines
    run = drive(cut(TX + b"".join(lines) + b".\r\nQUIT\r\n", points), limits=LINE_LIMITS)
    if max(map(len, lines)) > LINE_LIMITS.max_text_line:
        assert run.messages == [] and "500 5.5.2" in run.codes
    else:
        assert run.messages == [b"".join(line[1:] if dotted else line for line in lines)]


@pytest.mark.parametrize("read", [100, 997, 1000, 1001, 4096, 65536])
def test_lines_of_77_octets_in_any_reads(read: int) -> None:
    """Lines well under the limit are never taken for a long one where a read ends (a line
    split by a read used to be measured from the wrong place)."""
    text = b"y" * 75 + b"\r\n"
    for count in (13, 25, 26, 400):
        wire = TX + text * count + b".\r\nQUIT\r\n"
        run = drive([wire[i : i + read] for i in range(0, len(wire), read)])
        assert run.messages == [text * count]


@pytest.mark.parametrize("max_text_line", [1000, 0], ids=["line limit", "no line limit"])
def test_a_line_that_never_ends_is_not_held(max_text_line: int) -> None:
    """Content without a line end is refused at the limits, and the engine holds no more of
    it than a line (a client could otherwise send gigabytes of one line into memory)."""
    from minismtp.protocol import NEED_DATA, Engine
    from minismtp.types import Reply, Session

    limits = Limits(max_text_line=max_text_line, max_message_size=50_000)
    engine = Engine(Session(), limits)
    out = b""
    for chunk in [TX, *[b"x" * 3000] * 40, b"\r\n.\r\nQUIT\r\n"]:
        engine.receive_data(chunk)
        while (event := engine.next_event()) is not NEED_DATA and isinstance(event, Event):
            assert not isinstance(event, Data)
            engine.respond(Reply(220 if type(event).__name__ == "Connect" else 250, None, "ok"))
        out += engine.data_to_send()
        assert engine.buffered <= 50_000 + 3000 + 10
    expected = b"500 5.5.2 Message line too long" if max_text_line else b"552 5.3.4"
    assert out.endswith(expected + out.split(expected, 1)[1]) and b"221 2.0.0" in out


def test_a_pipelined_batch_is_parsed_where_it_lies() -> None:
    """A read of many whole messages (a client that does not wait for the 354) is parsed in
    place: taking each message off its front must not copy the rest, or a read of N messages
    would cost N times its size (a copy of less than a small read is allowed: that path
    joins the read to the content's tail)."""
    from minismtp.protocol import NEED_DATA, Engine
    from minismtp.types import Reply, Session

    message = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    engine = Engine(Session(), Limits())
    engine.next_event()
    engine.respond(Reply(220, None, "ok"))
    engine.receive_data(b"EHLO c\r\n")
    engine.next_event()
    engine.respond(Reply(250, None, "ok"))
    assert engine.next_event() is NEED_DATA
    batch = message * 1000  # 56 KB: most of it over the small-read size
    engine.receive_data(batch)
    messages = 0
    while (event := engine.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        if isinstance(event, Data):
            messages += 1
            assert event.transaction.size == len(b"Subject: x\r\n\r\nhi\r\n")
            held = engine._buf
            assert held is batch or len(held) <= content._SMALL_READ + len(message)
        engine.respond(Reply(250, "2.0.0", "ok"))
    assert messages == 1000
    assert engine.data_to_send().count(b"250 2.0.0 ok\r\n") == 3000
    assert engine._buf == b""  # taken to its end: the read is let go, not kept while idle


# Bytes mapped onto "a", CR and LF, so that short random pieces are mostly line ends.
_CRLF_ALPHABET = bytes(b"a\r\n"[i % 3] for i in range(256))


@settings(max_examples=2000, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=6).map(lambda b: b.translate(_CRLF_ALPHABET)), max_size=8),
    views=st.booleans(),
)
def test_bare_line_ends_found_in_pieces_as_in_their_join(pieces: list[bytes], views: bool) -> None:
    """BDAT content is checked in the pieces it arrived in; a CRLF may be split between two."""
    parts: list[bytes | memoryview] = [memoryview(p) for p in pieces] if views else list(pieces)
    outside_crlfs = b"".join(pieces).replace(b"\r\n", b"")  # what a CRLF does not cover
    bare = b"\r" in outside_crlfs or b"\n" in outside_crlfs
    assert content.pieces_have_bare_line_end(parts) == bare


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(st.sampled_from(CONTENT_TOKENS), max_size=40).map(b"".join),
    chunk_points=st.lists(st.integers(min_value=0), max_size=4),
    read_points=st.lists(st.integers(min_value=0), max_size=8),
    normalise=st.booleans(),
)
def test_bdat_content_is_the_text_whatever_the_chunks_and_reads(
    text: bytes, chunk_points: list[int], read_points: list[int], normalise: bool
) -> None:
    """RFC 3030 2: chunk content is taken exactly, dots and all; its line ends are checked as
    the octets come, a CRLF split between two chunks or two reads included: a CR or LF outside
    a CRLF refuses the message (550), or, normalising, becomes a CRLF."""
    chunks = cut(text, chunk_points) or [b""]
    wire = TX[: TX.index(b"DATA")] + b"".join(
        b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == len(chunks) - 1 else b"") + chunk
        for i, chunk in enumerate(chunks)
    )
    run = drive(
        cut(wire + b"QUIT\r\n", read_points),
        limits=Limits(accept_bare_line_endings=normalise, max_text_line=0),
    )
    if not BARE_CR_OR_LF.search(text):
        assert run.messages == [text]
    elif normalise:
        assert run.messages == [re.sub(rb"\r\n|\r|\n", b"\r\n", text)]
    else:
        assert run.messages == [] and "550 5.5.2" in run.codes
    assert run.codes[-1] == "221 2.0.0"
