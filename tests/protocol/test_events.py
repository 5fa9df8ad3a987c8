"""DataChunk events carry content as it streams in; Data refers to the whole message."""

from __future__ import annotations

import pytest

from minismtp.events import Data, DataChunk
from minismtp.message import Message
from minismtp.types import Address, Session, Transaction

CONTENT = b"Subject: x\r\n\r\nbody\r\n"
TRACE = b"Received: from x\r\n"


def test_a_chunk_shows_its_size_not_its_content() -> None:
    session = Session()
    transaction = Transaction(session, Address.null())
    chunk = DataChunk(session, transaction, memoryview(CONTENT))
    assert f"<{len(CONTENT)} octets>" in repr(chunk) and "body" not in repr(chunk)
    assert bytes(chunk.chunk) == CONTENT


def test_data_gives_the_transactions_message_its_content_and_size() -> None:
    session = Session()
    transaction = Transaction(session, Address.null())
    transaction.message = Message.from_bytes(TRACE + CONTENT, trace_length=len(TRACE))
    transaction.size = len(CONTENT)
    event = Data(session, transaction)
    assert event.message is transaction.message
    assert event.size == len(CONTENT)
    assert event.data == CONTENT  # without our trace header
    assert event.message.data == TRACE + CONTENT


def test_data_may_be_given_its_message_directly() -> None:
    """Middleware tests build events by hand."""
    session = Session()
    transaction = Transaction(session, Address.null())
    event = Data(session, transaction, Message.from_bytes(CONTENT))
    assert event.size == len(CONTENT) and event.data == CONTENT


def test_data_without_a_message_says_so() -> None:
    session = Session()
    event = Data(session, Transaction(session, Address.null()))
    with pytest.raises(RuntimeError, match="no message"):
        event.message  # noqa: B018
