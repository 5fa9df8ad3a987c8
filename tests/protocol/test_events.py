"""Data events carry the content in the pieces it arrived in, and join it once."""

from __future__ import annotations

from minismtp.events import Data
from minismtp.types import Address, Session, Transaction

CONTENT = b"Subject: x\r\n\r\nbody\r\n"


def pieces() -> list[bytes | memoryview]:
    return [b"Subject: x\r\n", memoryview(b"--\r\nbody\r\n")[2:]]


def test_data_joins_its_pieces_once_on_first_read() -> None:
    session = Session()
    event = Data(session, Transaction(session, Address.null()), pieces())
    assert event.size == len(CONTENT)
    assert event.data == CONTENT
    assert event.data is event.data
    assert event.size == len(CONTENT)


def test_prefixed_puts_the_prefix_in_front_in_one_join() -> None:
    session = Session()
    transaction = Transaction(session, Address.null())
    trace = b"Received: from x\r\n"
    assert Data(session, transaction, pieces()).prefixed(trace) == trace + CONTENT
    joined = Data(session, transaction, pieces())
    assert joined.data == CONTENT
    assert joined.prefixed(trace) == trace + CONTENT


def test_data_from_bytes_and_from_pieces_are_equal_and_repr_shows_the_size_only() -> None:
    session = Session()
    transaction = Transaction(session, Address.null())
    whole = Data(session, transaction, data=CONTENT)
    assert whole == Data(session, transaction, pieces())
    assert hash(whole) == hash(Data(session, transaction, pieces()))
    assert whole != Data(session, transaction, CONTENT + b"more\r\n")
    assert f"<{len(CONTENT)} octets>" in repr(whole) and "body" not in repr(whole)
