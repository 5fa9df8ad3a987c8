"""The engine in LMTP mode (RFC 2033), and per-recipient outcomes folded in SMTP mode.

Rows as in test_protocol_table: for every reply after the greeting, its code and (except for
354) its enhanced status code. After the end of the content an LMTP server owes one reply per
RCPT that succeeded, in RCPT order (RFC 2033 4.2).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from minismtp.events import Data, Event, Rcpt
from minismtp.protocol import NEED_DATA, Engine, Limits, fold_replies
from minismtp.received import with_protocol
from minismtp.types import Address, Reply, Session, TLSInfo, Transaction
from tests.helpers.engine_driver import accept_all, drive, split_replies

L = b"LHLO client.example\r\n"
M = b"MAIL FROM:<a@example.org>\r\n"
R1 = b"RCPT TO:<one@example.com>\r\n"
R2 = b"RCPT TO:<two@example.com>\r\n"
NOBODY = b"RCPT TO:<nobody@example.com>\r\n"
MSG = b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"

LHLO = "250"
OK = "250 2.0.0"
MAIL_OK = "250 2.1.0"
RCPT_OK = "250 2.1.5"
QUEUED = "250 2.0.0"
SEQ = "503 5.5.1"
NOT_SMTP = "500 5.5.1"
UNKNOWN = "500 5.5.2"
ARGS = "501 5.5.4"
NO_MAILBOX = "550 5.1.1"
FULL = "452 4.2.2"

Responder = Callable[[Event], Reply | None]


def per_recipient(outcomes: dict[str, Reply]) -> Responder:
    """Answer the Data event as the App does: the differing outcomes on the transaction."""

    def respond(event: Event) -> Reply | None:
        if isinstance(event, Data):
            tx = event.transaction
            for address in tx.rcpt_to:
                if str(address) in outcomes:
                    tx.recipient_replies[address] = outcomes[str(address)]
        return None

    return respond


def refuse_data(reply: Reply) -> Responder:
    return lambda event: reply if isinstance(event, Data) else None


def refuse_rcpt(address: str) -> Responder:
    """Refuse one recipient at RCPT."""
    refusal = Reply(550, "5.1.1", "No such mailbox")
    return lambda event: (
        refusal if isinstance(event, Rcpt) and str(event.address) == address else None
    )


def fail_message_but_refuse_nobody(event: Event) -> Reply | None:
    """The message's hand-over failed (451), but nobody@ was refused for good before it."""
    if isinstance(event, Data):
        REFUSE_NOBODY(event)
        return Reply(451, "4.3.0", "Local error")
    return None


REFUSE_NOBODY = per_recipient({"nobody@example.com": Reply(550, "5.1.1", "No such mailbox")})

# A table, one case a line: not formatted.
# fmt: off
LMTP_CASES: list[tuple[str, bytes | list[bytes], list[str], dict[str, object]]] = [
    # RFC 2033 4.1 LHLO
    ("4.1 LHLO", L, [LHLO], {}),
    ("4.1 lhlo in lower case", b"lhlo x\r\n", [LHLO], {}),
    ("4.1 LHLO needs a domain", b"LHLO\r\n", [ARGS], {}),
    ("4.1 HELO is refused", b"HELO client.example\r\n", [NOT_SMTP], {}),
    ("4.1 EHLO is refused", b"EHLO client.example\r\n", [NOT_SMTP], {}),
    ("4.1 EHLO refused, then LHLO", b"EHLO x\r\n" + L + M, [NOT_SMTP, LHLO, MAIL_OK], {}),
    ("4.1 MAIL before LHLO", M, [SEQ], {}),
    ("4.1 MAIL after a refused EHLO", b"EHLO x\r\n" + M, [NOT_SMTP, SEQ], {}),
    ("4.1 LHLO twice resets the transaction", L + M + L + R1, [LHLO, MAIL_OK, LHLO, SEQ], {}),
    # RFC 2033 4.2 DATA: one reply per successful RCPT, in order
    ("4.2 one recipient", L + M + R1 + MSG, [LHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {}),
    ("4.2 two recipients, two replies", L + M + R1 + R2 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED, QUEUED], {}),
    ("4.2 empty message", L + M + R1 + R2 + b"DATA\r\n.\r\n", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED, QUEUED], {}),
    ("4.2 a refused RCPT is owed nothing", L + M + R1 + NOBODY + R2 + MSG, [LHLO, MAIL_OK, RCPT_OK, NO_MAILBOX, RCPT_OK, "354", QUEUED, QUEUED], {"respond": refuse_rcpt("nobody@example.com")}),
    ("4.2 a duplicate RCPT gets its own reply", L + M + R1 + R1 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED, QUEUED], {}),
    ("4.2 duplicate in another case of the domain", L + M + R1 + b"RCPT TO:<one@EXAMPLE.com>\r\n" + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED, QUEUED], {}),
    ("4.2 per-recipient outcomes in RCPT order", L + M + R1 + NOBODY + R2 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, RCPT_OK, "354", QUEUED, NO_MAILBOX, QUEUED], {"respond": REFUSE_NOBODY}),
    ("4.2 a duplicate of a refused recipient is refused twice", L + M + NOBODY + R1 + NOBODY + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, RCPT_OK, "354", NO_MAILBOX, QUEUED, NO_MAILBOX], {"respond": REFUSE_NOBODY}),
    ("4.2 every recipient refused", L + M + NOBODY + MSG, [LHLO, MAIL_OK, RCPT_OK, "354", NO_MAILBOX], {"respond": REFUSE_NOBODY}),
    ("4.2 a refusal of the message goes to each recipient", L + M + R1 + R2 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", "554 5.7.1", "554 5.7.1"], {"respond": refuse_data(Reply(554, "5.7.1", "Spam"))}),
    ("4.2 a recipient's own outcome beats the message's", L + M + R1 + NOBODY + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", "451 4.3.0", NO_MAILBOX], {"respond": fail_message_but_refuse_nobody}),
    ("4.2 DATA without a recipient is 503", L + M + b"DATA\r\n", [LHLO, MAIL_OK, SEQ], {}),
    ("4.2 DATA with only refused recipients is 503", L + M + NOBODY + b"DATA\r\n", [LHLO, MAIL_OK, NO_MAILBOX, SEQ], {"respond": refuse_rcpt("nobody@example.com")}),
    ("4.2 DATA before MAIL", L + b"DATA\r\n", [LHLO, SEQ], {}),
    ("4.2 the transaction ends with the replies", L + M + R1 + MSG + R2, [LHLO, MAIL_OK, RCPT_OK, "354", QUEUED, SEQ], {}),
    ("4.2 two transactions, counted apart", L + M + R1 + R2 + MSG + M + R1 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED, QUEUED, MAIL_OK, RCPT_OK, "354", QUEUED], {}),
    ("4.2 RSET forgets the recipients", L + M + R1 + b"RSET\r\n" + M + R2 + MSG, [LHLO, MAIL_OK, RCPT_OK, OK, MAIL_OK, RCPT_OK, "354", QUEUED], {}),
    ("4.2 message over the size, once per recipient", L + M + R1 + R2 + b"DATA\r\n" + b"x" * 200 + b"\r\n.\r\n" + b"NOOP\r\n", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", "552 5.3.4", "552 5.3.4", OK], {"limits": Limits(max_message_size=100)}),
    ("4.2 bare LF, once per recipient", L + M + R1 + R2 + b"DATA\r\na\nb\r\n.\r\n", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", "550 5.5.2", "550 5.5.2"], {}),
    ("4.2 line too long, once per recipient", L + M + R1 + R1 + b"DATA\r\n" + b"x" * 999 + b"\r\n.\r\n", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", UNKNOWN, UNKNOWN], {}),
    # RFC 3030 with RFC 2033: BDAT ... LAST is answered as the final dot is
    ("RFC 3030 BDAT LAST, one reply per recipient", L + M + R1 + R2 + b"BDAT 5 LAST\r\nhello", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, QUEUED, QUEUED], {}),
    ("RFC 3030 a middle chunk gets one reply", L + M + R1 + R2 + b"BDAT 3\r\nabcBDAT 2 LAST\r\nde", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, OK, QUEUED, QUEUED], {}),
    ("RFC 3030 BDAT 0 LAST ends", L + M + R1 + R2 + b"BDAT 3\r\nabcBDAT 0 LAST\r\n", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, OK, QUEUED, QUEUED], {}),
    ("RFC 3030 BDAT LAST, per-recipient outcomes", L + M + NOBODY + R1 + b"BDAT 2 LAST\r\nab", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, NO_MAILBOX, QUEUED], {"respond": REFUSE_NOBODY}),
    ("RFC 3030 BDAT without a recipient is 503", L + M + b"BDAT 4 LAST\r\nabcdNOOP\r\n", [LHLO, MAIL_OK, SEQ, OK], {}),
    ("RFC 3030 BDAT before MAIL", L + b"BDAT 4\r\nabcd", [LHLO, SEQ], {}),
    ("RFC 3030 chunk over the size, once per recipient", L + M + R1 + R2 + b"BDAT 200 LAST\r\n" + b"x" * 200, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "552 5.3.4", "552 5.3.4"], {"limits": Limits(max_message_size=100)}),
    ("RFC 3030 a middle chunk over the size: one reply, the chunk's", L + M + R1 + R2 + b"BDAT 200\r\n" + b"x" * 200 + b"NOOP\r\n", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "552 5.3.4", OK], {"limits": Limits(max_message_size=100)}),
    ("RFC 3030 bare LF in a chunk, once per recipient", L + M + R1 + R1 + b"BDAT 3 LAST\r\na\nb", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "550 5.5.2", "550 5.5.2"], {}),
    # As in SMTP
    ("RFC 3207 STARTTLS, then LHLO again", [L + b"STARTTLS\r\n", L + M], [LHLO, "220 2.0.0", LHLO, MAIL_OK], {"tls_available": True}),
    ("RFC 3207 after TLS, MAIL needs LHLO", [L + b"STARTTLS\r\n", M], [LHLO, "220 2.0.0", SEQ], {"tls_available": True}),
    ("RFC 1870 SIZE over the limit", L + b"MAIL FROM:<a@b.c> SIZE=999\r\n", [LHLO, "552 5.3.4"], {"limits": Limits(max_message_size=100)}),
    ("RFC 6152 BODY=8BITMIME", L + b"MAIL FROM:<a@b.c> BODY=8BITMIME\r\n", [LHLO, MAIL_OK], {}),
    ("RFC 6531 SMTPUTF8", L + b"MAIL FROM:<a@b.c> SMTPUTF8\r\n" + "RCPT TO:<jörg@bücher.de>\r\n".encode(), [LHLO, MAIL_OK, RCPT_OK], {}),
    ("5321 4.1.1.8 HELP", b"HELP\r\n", ["214 2.0.0"], {}),
    ("5321 4.1.1.10 QUIT", L + b"QUIT\r\n", [LHLO, "221 2.0.0"], {}),
    ("5321 4.5.3.1.8 too many recipients", L + M + R1 + R2 + NOBODY + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "452 4.5.3", "354", QUEUED, QUEUED], {"limits": Limits(max_recipients=2)}),
]
# fmt: on

# Outcomes after the data in SMTP mode: folded into the one reply SMTP has.
# A table, one case a line: not formatted.
# fmt: off
SMTP_CASES: list[tuple[str, bytes, list[str], dict[str, object]]] = [
    ("LHLO is no SMTP command", b"LHLO client.example\r\n", [UNKNOWN], {}),
    ("3.3 one reply for two recipients", b"EHLO x\r\n" + M + R1 + R2 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED], {}),
    ("3.6.3 mixed outcomes: accepted", b"EHLO x\r\n" + M + R1 + NOBODY + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED], {"respond": REFUSE_NOBODY}),
    ("3.3 every recipient refused: the refusal", b"EHLO x\r\n" + M + NOBODY + MSG, [LHLO, MAIL_OK, RCPT_OK, "354", NO_MAILBOX], {"respond": REFUSE_NOBODY}),
    ("4.2.5 all refused, transient first", b"EHLO x\r\n" + M + NOBODY + R1 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", FULL], {"respond": per_recipient({"nobody@example.com": Reply(550, "5.1.1", "No such mailbox"), "one@example.com": Reply(452, "4.2.2", "Mailbox full")})}),
    ("3.3 BDAT LAST, mixed outcomes: accepted", b"EHLO x\r\n" + M + NOBODY + R1 + b"BDAT 2 LAST\r\nab", [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, QUEUED], {"respond": REFUSE_NOBODY}),
    ("3.3 duplicates are one recipient", b"EHLO x\r\n" + M + R1 + R1 + MSG, [LHLO, MAIL_OK, RCPT_OK, RCPT_OK, "354", QUEUED], {}),
]
# fmt: on


@pytest.mark.parametrize(
    ("data", "expected", "options"),
    [
        pytest.param(data, expected, options, id=name)
        for name, data, expected, options in LMTP_CASES
    ],
)
def test_lmtp_wire(
    data: bytes | list[bytes], expected: list[str], options: dict[str, object]
) -> None:
    run = drive(data, lmtp=True, **options)  # type: ignore[arg-type]
    assert run.codes == expected


@pytest.mark.parametrize(
    ("data", "expected", "options"),
    [
        pytest.param(data, expected, options, id=name)
        for name, data, expected, options in SMTP_CASES
    ],
)
def test_smtp_folds_recipient_outcomes(
    data: bytes, expected: list[str], options: dict[str, object]
) -> None:
    run = drive(data, **options)  # type: ignore[arg-type]
    assert run.codes == expected


def test_lhlo_lists_pipelining_and_enhanced_status_codes() -> None:
    """RFC 2033 4.1: an LMTP server offers PIPELINING and ENHANCEDSTATUSCODES."""
    lines = drive(L, lmtp=True).out.decode().split("\r\n")[1:-1]
    assert "250-PIPELINING" in lines
    assert "250-ENHANCEDSTATUSCODES" in lines
    assert "250-CHUNKING" in lines


def test_lhlo_makes_an_esmtp_session_in_lmtp() -> None:
    run = drive(L, lmtp=True)
    session = run.engine.session
    assert session.lmtp and session.esmtp and session.helo_name == "client.example"
    assert session.protocol == "LMTP"


def test_refused_helo_names_lhlo() -> None:
    run = drive(b"HELO x\r\nHELP\r\n", lmtp=True)
    assert run.replies[0] == "500 5.5.1 Error: this is an LMTP server, send LHLO"
    assert "LHLO" in run.replies[1] and "EHLO" not in run.replies[1]


def test_per_recipient_replies_keep_their_text() -> None:
    run = drive(L + M + R1 + NOBODY + MSG, lmtp=True, respond=REFUSE_NOBODY)
    assert run.replies[-2:] == ["250 2.0.0 OK queued", "550 5.1.1 No such mailbox"]


def test_the_transaction_ends_with_the_message_reply() -> None:
    """For logs: an LMTP transaction ends with the App's reply to the message."""
    run = drive(L + M + R1 + NOBODY + MSG, lmtp=True, respond=REFUSE_NOBODY)
    (finished,) = run.engine.finished
    assert finished.reply_code == 250
    assert [str(a) for a in finished.recipient_replies] == ["nobody@example.com"]
    assert run.engine.session.transactions == 1


def test_every_recipient_refused_counts_no_message() -> None:
    run = drive(L + M + NOBODY + MSG, lmtp=True, respond=REFUSE_NOBODY)
    assert run.engine.session.transactions == 0


def _engine(lmtp: bool = True) -> Engine:
    engine = Engine(Session(hostname="mx.test"), lmtp=lmtp)
    event = engine.next_event()
    assert isinstance(event, Event)
    engine.respond(accept_all(event))
    assert engine.next_event() is NEED_DATA
    engine.data_to_send()
    return engine


def _answer_until_need_data(engine: Engine, respond: Responder = lambda e: None) -> None:
    while (event := engine.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        engine.respond(respond(event) or accept_all(event))


def test_pipelined_per_recipient_replies_come_out_in_one_write() -> None:
    """RFC 2033 4.2 with RFC 2920: the whole pipelined group, message and all, answered in one
    write, the recipients' replies after the 354 in RCPT order."""
    engine = _engine()
    engine.receive_data(L + M + R1 + NOBODY + R2 + MSG + b"QUIT\r\n")
    event = engine.next_event()
    while isinstance(event, Event):
        engine.respond(REFUSE_NOBODY(event) or accept_all(event))
        event = engine.next_event()
    out = engine.data_to_send()
    assert [r.splitlines()[-1][:9] for r in split_replies(out)] == [
        "250 HELP",
        MAIL_OK,
        RCPT_OK,
        RCPT_OK,
        RCPT_OK,
        "354 End d",
        QUEUED,
        NO_MAILBOX,
        QUEUED,
        "221 2.0.0",
    ]
    assert engine.data_to_send() == b""


def test_the_replies_after_the_dot_are_one_write() -> None:
    """A client that waits for the 354 gets its recipients' replies together after the dot."""
    engine = _engine()
    engine.receive_data(L + M + R1 + R2 + NOBODY + b"DATA\r\n")
    _answer_until_need_data(engine)
    engine.data_to_send()
    engine.receive_data(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    _answer_until_need_data(engine, REFUSE_NOBODY)
    out = engine.data_to_send()
    assert out.count(b"\r\n") == 3
    assert out.endswith(b"550 5.1.1 No such mailbox\r\n")


def test_an_lmtp_session_is_written_lmtp_in_the_received_header() -> None:
    """RFC 3848: LMTP, LMTPS; RFC 6531 3.7.3: UTF8LMTP, UTF8LMTPS."""
    session = Session(lmtp=True, esmtp=True)
    plain = Transaction(session, Address("a", "b.c"))
    utf8 = Transaction(session, Address("a", "b.c"), {"SMTPUTF8": None})
    assert with_protocol(session, plain) == "LMTP"
    assert with_protocol(session, utf8) == "UTF8LMTP"
    session.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    assert with_protocol(session, plain) == "LMTPS"
    assert with_protocol(session, utf8) == "UTF8LMTPS"
    smtp = Session(esmtp=True)
    assert (
        with_protocol(smtp, Transaction(smtp, Address("a", "b.c"), {"SMTPUTF8": None}))
        == "UTF8SMTP"
    )


OK_REPLY = Reply(250, "2.0.0", "OK queued as X")
GONE = Reply(550, "5.1.1", "No such mailbox")
BUSY = Reply(452, "4.2.2", "Mailbox full")


@pytest.mark.parametrize(
    ("reply", "outcomes", "folded"),
    [
        pytest.param(OK_REPLY, [OK_REPLY, OK_REPLY], OK_REPLY, id="all accepted"),
        pytest.param(OK_REPLY, [OK_REPLY, GONE], OK_REPLY, id="mixed: accepted"),
        pytest.param(OK_REPLY, [GONE, GONE], GONE, id="all refused"),
        pytest.param(OK_REPLY, [GONE, BUSY], BUSY, id="all refused, transient first"),
        pytest.param(
            LOCAL := Reply(451, "4.3.0", "Local error"), [LOCAL, GONE], LOCAL, id="failed hand-over"
        ),
        pytest.param(LOCAL, [GONE, OK_REPLY], OK_REPLY, id="one stored by other means"),
        pytest.param(OK_REPLY, [], OK_REPLY, id="no outcomes"),
    ],
)
def test_fold_replies(reply: Reply, outcomes: list[Reply], folded: Reply) -> None:
    assert fold_replies(reply, outcomes) == folded


def test_a_unix_socket_peer_is_named_in_the_received_header() -> None:
    """No client address on a unix socket: its path, in a comment (RFC 5322 3.2.2)."""
    from minismtp.received import received_header

    session = Session(
        lmtp=True, esmtp=True, helo_name="postfix.example", peer=("/run/m/lmtp.sock", 0)
    )
    tx = Transaction(session, Address("a", "b.c"))
    header = received_header(session, tx, "ID1", by="lists.example", when=0).decode()
    assert header.startswith("Received: from postfix.example (unix:/run/m/lmtp.sock)\r\n")
    assert "\tby lists.example with LMTP id ID1" in header
    odd = Session(esmtp=True, helo_name="x", peer=("/tmp/a (b)\\c.sock", 0))
    header = received_header(
        odd, Transaction(odd, Address("a", "b.c")), "ID2", by="mx", when=0
    ).decode()
    assert "(unix:/tmp/a??b??c.sock)" in header
