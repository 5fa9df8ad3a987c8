"""Per-recipient answers after the data: on_data hooks and stores return {Address: Reply}.

LMTP answers each accepted recipient with its own reply (RFC 2033 4.2); SMTP folds them into
the one reply it has (RFC 5321 3.3, 3.6.3): all accepted 250, all refused the refusal, mixed
250 with the refusals recorded on the Message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest

from minismtp import App, Reply
from minismtp.message import Message
from minismtp.stores.mailboxes import Mailboxes
from minismtp.testing import TestClient
from minismtp.types import Address, Transaction

pytestmark = pytest.mark.anyio

BODY = b"Subject: per recipient\r\n\r\nHello.\r\n"
GONE = Reply(550, "5.1.1", "No such mailbox")
FULL = Reply(452, "4.2.2", "Mailbox full")


def refusing(*local_parts: str, reply: Reply = GONE) -> App:
    app = App(hostname="lmtp.test")

    @app.on_data
    def per_recipient(tx: Transaction, message: Message) -> dict[Address, Reply]:
        return {r: reply for r in tx.rcpt_to if r.local_part in local_parts}

    return app


def codes(replies: list[Reply]) -> list[str]:
    return [f"{r.code} {r.status}" for r in replies]


async def lmtp_send(
    app: App, recipients: list[str], body: bytes = BODY, **client: object
) -> tuple[list[Reply], list[Message]]:
    async with TestClient(app, lmtp=True, **client) as c:  # type: ignore[arg-type]
        await c.lhlo("mta.test")
        replies = await c.send_message("a@example.org", recipients, body)
        return replies, list(c.messages)


# -- LMTP ---------------------------------------------------------------------------------------


async def test_lmtp_each_recipient_gets_its_own_reply_rfc2033_4_2() -> None:
    app = refusing("nobody")
    replies, messages = await lmtp_send(app, ["one@x.test", "nobody@x.test", "two@x.test"])
    assert codes(replies) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5",
                              "250 2.0.0", "550 5.1.1", "250 2.0.0"]  # fmt: skip
    assert replies[-2].text == "No such mailbox"
    (message,) = messages
    # Handed over for the recipients left; the refusal recorded.
    assert [str(r) for r in message.rcpt_to] == ["one@x.test", "two@x.test"]
    assert {str(a): r for a, r in message.recipient_replies.items()} == {"nobody@x.test": GONE}
    assert replies[-1].text == f"OK queued as {message.id}"


async def test_lmtp_every_recipient_refused_hands_nothing_over() -> None:
    app = refusing("nobody", "none")
    replies, messages = await lmtp_send(app, ["nobody@x.test", "none@x.test"])
    assert codes(replies)[-2:] == ["550 5.1.1", "550 5.1.1"]
    assert messages == []
    assert app.messages.statistics().current_buffer_used == 0


async def test_lmtp_a_mapping_may_give_a_recipient_its_own_success() -> None:
    app = App()

    @app.on_data
    async def note(tx: Transaction, message: Message) -> Mapping[Address, Reply]:
        return {tx.rcpt_to[0]: Reply(250, "2.1.5", "Delivered to the list")}

    replies, _ = await lmtp_send(app, ["list@x.test", "b@x.test"])
    assert [r.text for r in replies[-2:]] == ["Delivered to the list", replies[-1].text]
    assert replies[-1].text.startswith("OK queued as ")


async def test_lmtp_a_later_reply_refuses_the_rest_the_mapping_keeps_its_own() -> None:
    app = refusing("nobody")

    @app.on_data
    def spam(tx: Transaction, message: Message) -> Reply:
        return Reply(554, "5.7.1", "Spam")

    replies, messages = await lmtp_send(app, ["one@x.test", "nobody@x.test"])
    assert codes(replies)[-2:] == ["554 5.7.1", "550 5.1.1"]
    assert messages == []


async def test_an_empty_mapping_accepts_everyone() -> None:
    app = refusing("nobody")
    replies, messages = await lmtp_send(app, ["one@x.test", "two@x.test"])
    assert codes(replies)[-2:] == ["250 2.0.0", "250 2.0.0"]
    assert len(messages) == 1 and messages[0].recipient_replies == {}


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(
            lambda tx: {Address("stranger", "x.test"): GONE}, ValueError, id="not a recipient"
        ),
        pytest.param(lambda tx: {tx.rcpt_to[0]: "550 no"}, TypeError, id="not a Reply"),
    ],
)
async def test_a_bad_mapping_is_the_hooks_bug(answer: object, error: type[Exception]) -> None:
    app = App()
    app.on_data(lambda tx, message: answer(tx))  # type: ignore[operator]
    with pytest.raises(error):
        await lmtp_send(app, ["one@x.test"])
    replies, _ = await lmtp_send(app, ["one@x.test", "two@x.test"], raise_server_exceptions=False)
    assert codes(replies)[-2:] == ["451 4.3.0", "451 4.3.0"]


# -- stores -------------------------------------------------------------------------------------


class PickyStore:
    """A store that delivers to some recipients and answers for the others."""

    spool_dir: Path | None = None

    def __init__(self, answers: dict[str, Reply]) -> None:
        self.answers = answers
        self.stored: list[tuple[str, ...]] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def put(self, message: Message) -> Mapping[Address, Reply] | None:
        refused = {r: self.answers[str(r)] for r in message.rcpt_to if str(r) in self.answers}
        self.stored.append(tuple(str(r) for r in message.rcpt_to if r not in refused))
        return refused


async def test_lmtp_a_store_answers_per_recipient() -> None:
    store = PickyStore({"full@x.test": FULL})
    app = App(store=store)
    replies, messages = await lmtp_send(app, ["full@x.test", "one@x.test"])
    assert codes(replies)[-2:] == ["452 4.2.2", "250 2.0.0"]
    assert store.stored == [("one@x.test",)]
    (message,) = messages
    assert {str(a) for a in message.recipient_replies} == {"full@x.test"}


async def test_a_store_is_not_asked_about_recipients_a_hook_refused() -> None:
    store = PickyStore({})
    app = App(store=store)
    app.on_data(lambda tx, message: {r: GONE for r in tx.rcpt_to if r.local_part == "nobody"})
    replies, _ = await lmtp_send(app, ["nobody@x.test", "one@x.test"])
    assert codes(replies)[-2:] == ["550 5.1.1", "250 2.0.0"]
    assert store.stored == [("one@x.test",)]


async def test_lmtp_into_mailboxes(tmp_path: Path) -> None:
    """The Maildir-per-recipient store behind LMTP: delivered, or the recipient's reply."""
    (tmp_path / "x.test" / "alice").mkdir(parents=True)
    app = App(store=Mailboxes(tmp_path))
    replies, _ = await lmtp_send(app, ["alice@x.test", "bob@x.test"])
    assert codes(replies)[-2:] == ["250 2.0.0", "550 5.1.1"]
    (stored,) = (tmp_path / "x.test" / "alice" / "new").iterdir()
    assert stored.read_bytes().endswith(BODY)
    assert b"with LMTP" in stored.read_bytes().split(b"\r\n\r\n")[0]


async def test_a_large_message_is_spooled_beside_the_mailboxes_and_linked(tmp_path: Path) -> None:
    """Past spool_memory the content goes to a file in the store's spool_dir as it streams
    in; each mailbox then gets a link to that file, and the spool's name goes."""
    for name in ("alice", "bob"):
        (tmp_path / "x.test" / name).mkdir(parents=True)
    app = App(store=Mailboxes(tmp_path), spool_memory=1024)
    big = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 200
    replies, (message,) = await lmtp_send(app, ["alice@x.test", "bob@x.test"], body=big)
    assert codes(replies)[-2:] == ["250 2.0.0", "250 2.0.0"]
    (a,) = (tmp_path / "x.test" / "alice" / "new").iterdir()
    (b,) = (tmp_path / "x.test" / "bob" / "new").iterdir()
    (spooled,) = (tmp_path / ".spool").iterdir()
    assert a.stat().st_ino == b.stat().st_ino == spooled.stat().st_ino
    message.close()  # the consumer is done: the spool's name goes, the mailboxes' stay
    assert list((tmp_path / ".spool").iterdir()) == []
    assert a.stat().st_nlink == 2 and a.read_bytes().endswith(big)


# -- SMTP: folded -------------------------------------------------------------------------------


async def smtp_send(app: App, recipients: list[str]) -> tuple[list[Reply], list[Message]]:
    async with TestClient(app) as c:
        replies = await c.send_message("a@example.org", recipients, BODY)
        return replies, list(c.messages)


async def test_smtp_mixed_outcomes_accept_and_record_rfc5321_3_6_3(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = refusing("nobody")
    with caplog.at_level(logging.WARNING, logger="minismtp.app"):
        replies, messages = await smtp_send(app, ["one@x.test", "nobody@x.test"])
    assert codes(replies)[-1:] == ["250 2.0.0"]
    (message,) = messages
    assert [str(r) for r in message.rcpt_to] == ["one@x.test"]
    assert {str(a): r for a, r in message.recipient_replies.items()} == {"nobody@x.test": GONE}
    assert "nobody@x.test" in caplog.text and "550 5.1.1" in caplog.text


async def test_smtp_every_recipient_refused_is_the_refusal() -> None:
    app = refusing("nobody")
    replies, messages = await smtp_send(app, ["nobody@x.test"])
    assert codes(replies)[-1:] == ["550 5.1.1"]
    assert messages == []


async def test_smtp_every_recipient_refused_transient_first() -> None:
    store = PickyStore({"full@x.test": FULL, "gone@x.test": GONE})
    app = App(store=store)
    replies, messages = await smtp_send(app, ["gone@x.test", "full@x.test"])
    assert codes(replies)[-1:] == ["452 4.2.2"]
    assert messages == []


async def test_smtp_all_accepted_is_250() -> None:
    store = PickyStore({})
    replies, messages = await smtp_send(App(store=store), ["one@x.test", "two@x.test"])
    assert codes(replies)[-1:] == ["250 2.0.0"]
    assert len(messages) == 1
