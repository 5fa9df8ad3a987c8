"""The App: default replies, hooks, middleware, errors, the hand-over, the serving period."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import anyio
import pytest

from minismtp.app import LOCAL_ERROR, App, default_app
from minismtp.events import Connect, Event, Handler, Helo, Mail, Rcpt
from minismtp.ids import new_id
from minismtp.protocol import Limits
from minismtp.testing import TestClient
from minismtp.types import Address, Message, Reply, Session, Transaction, queued_reply

pytestmark = pytest.mark.anyio

BODY = b"Subject: test\r\n\r\nHello.\r\n"


class Boom(Exception):
    pass


async def one_message(client: TestClient, rcpts: tuple[str, ...] = ("bob@example.com",)) -> Reply:
    replies = await client.send_message("alice@example.org", rcpts, BODY)
    return replies[-1]


# -- default replies (RFC 5321 4.2, 4.3.2) -------------------------------------------------------


async def test_rfc5321_4_3_2_default_replies() -> None:
    app = App(hostname="mx.example.com")
    async with TestClient(app) as client:
        assert await client.connect() == Reply(220, None, "mx.example.com ESMTP")
        assert await client.helo("c.example.org") == Reply(250, None, "mx.example.com")
        ehlo = await client.ehlo("c.example.org")
        assert ehlo.code == 250 and ehlo.status is None
        assert ehlo.lines[0] == "mx.example.com"
        assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= set(ehlo.lines[1:])
        assert await client.mail("alice@example.org") == Reply(250, "2.1.0", "OK")
        assert await client.rcpt("bob@example.com") == Reply(250, "2.1.5", "OK")
        final = await client.data(BODY)
    assert final.code == 250 and final.status == "2.0.0"
    assert final.text == f"OK queued as {client.messages[0].id}"


async def test_hostname_can_be_changed_after_construction() -> None:
    app = App(hostname="a.example")
    app.hostname = "b.example"
    async with TestClient(app) as client:
        assert (await client.connect()).text == "b.example ESMTP"
        assert (await client.ehlo()).lines[0] == "b.example"


async def test_limit_shortcuts_reach_the_engine() -> None:
    """RFC 1870 SIZE advertised from max_size; RFC 5321 4.5.3.1.8 452 past max_recipients."""
    app = App(max_size=1000, max_recipients=2)
    assert app.limits == Limits(max_message_size=1000, max_recipients=2)
    async with TestClient(app) as client:
        assert "SIZE 1000" in (await client.ehlo()).lines
        await client.mail("a@example.org")
        assert (await client.rcpt("b1@example.com")).code == 250
        assert (await client.rcpt("b2@example.com")).code == 250
        assert await client.rcpt("b3@example.com") == Reply(452, "4.5.3", "Too many recipients")


# -- hooks ----------------------------------------------------------------------------------


async def test_sync_and_async_hooks_none_accepts_and_a_reply_answers() -> None:
    app = App()
    seen: list[str] = []

    @app.on_connect
    def connect(session: Session) -> None:
        seen.append(f"connect {session.peer_host}")

    @app.on_helo
    async def helo(session: Session, name: str) -> None:
        seen.append(f"helo {name}")

    @app.on_mail
    def mail(tx: Transaction, sender: Address) -> Reply | None:
        seen.append(f"mail {sender}")
        return Reply(550, "5.7.1", "Sender refused") if sender.domain == "spam.example" else None

    @app.on_rcpt
    async def rcpt(tx: Transaction, rcpt: Address) -> Reply | None:
        seen.append(f"rcpt {rcpt}")
        return Reply(550, "5.1.1", "No such user") if rcpt.local_part == "nobody" else None

    @app.on_data
    def data(tx: Transaction, message: Message) -> Reply | None:
        seen.append(f"data {message.size}")
        return Reply(554, "5.6.0", "Refused") if b"virus" in message.original else None

    async with TestClient(app) as client:
        await client.ehlo("c.example.org")
        assert await client.mail("x@spam.example") == Reply(550, "5.7.1", "Sender refused")
        assert (await client.mail("alice@example.org")).code == 250
        assert await client.rcpt("nobody@example.com") == Reply(550, "5.1.1", "No such user")
        assert (await client.rcpt("bob@example.com")).code == 250
        assert await client.data(b"a virus\r\n") == Reply(554, "5.6.0", "Refused")
        assert (await one_message(client)).code == 250
    assert seen[:7] == [
        "connect 127.0.0.1",
        "helo c.example.org",
        "mail x@spam.example",
        "mail alice@example.org",
        "rcpt nobody@example.com",
        "rcpt bob@example.com",
        "data 9",
    ]
    assert len(client.messages) == 1  # the refused message was not handed over


async def test_first_hook_with_a_reply_wins_and_later_hooks_are_skipped() -> None:
    app = App()
    calls: list[int] = []

    @app.on_rcpt
    def first(tx: Transaction, rcpt: Address) -> None:
        calls.append(1)

    @app.on_rcpt
    async def second(tx: Transaction, rcpt: Address) -> Reply:
        calls.append(2)
        return Reply(450, "4.2.0", "Try later")

    @app.on_rcpt
    def third(tx: Transaction, rcpt: Address) -> None:
        calls.append(3)

    async with TestClient(app) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        assert await client.rcpt("b@example.com") == Reply(450, "4.2.0", "Try later")
    assert calls == [1, 2]


async def test_connect_hook_refusal_ends_the_session() -> None:
    """RFC 5321 3.1: a 554 greeting refuses service; the client may only QUIT."""
    app = App()
    app.on_connect(lambda session: Reply(554, "5.7.1", "No service for you"))
    async with TestClient(app) as client:
        assert await client.connect() == Reply(554, "5.7.1", "No service for you")
        assert not client.connected


async def test_hook_returning_something_else_is_a_type_error() -> None:
    app = App()
    app.on_mail(lambda tx, sender: True)  # type: ignore[type-var]
    async with TestClient(app) as client:
        await client.ehlo()
        with pytest.raises(TypeError, match="None or a Reply"):
            await client.mail("a@example.org")


async def test_data_hook_sees_the_whole_message_before_the_received_header() -> None:
    app = App()
    seen: list[tuple[bytes, list[Address]]] = []

    @app.on_data
    async def data(tx: Transaction, message: Message) -> None:
        seen.append((message.original, list(tx.rcpt_to)))

    async with TestClient(app) as client:
        await one_message(client)
    assert seen == [(BODY, [Address("bob", "example.com")])]
    assert client.messages[0].original == BODY


# -- middleware -------------------------------------------------------------------------------


class Recorder:
    """Appends its name to ``log`` on the way in and ``/name`` on the way out."""

    built = 0

    def __init__(self, app: Handler, *, name: str, log: list[str]) -> None:
        self.app = app
        self.name = name
        self.log = log
        Recorder.built += 1

    async def __call__(self, event: Event) -> Reply:
        self.log.append(self.name)
        reply = await self.app(event)
        self.log.append("/" + self.name)
        return reply


def recorded(log: list[str], *layers: tuple[type[Recorder], str]) -> App:
    """An App with these Recorders added in this order (so the last runs first)."""
    app = App()
    for recorder, name in layers:
        app.add_middleware(recorder, name=name, log=log)
    return app


async def test_middleware_last_added_runs_first_and_the_stack_is_built_once() -> None:
    log: list[str] = []
    app = recorded(log, (Recorder, "first"), (Recorder, "second"), (Recorder, "third"))

    @app.on_connect
    def hook(session: Session) -> None:
        log.append("hook")

    Recorder.built = 0
    async with TestClient(app) as client:
        await client.connect()
        assert log == ["third", "second", "first", "hook", "/first", "/second", "/third"]
        await one_message(client)
    assert Recorder.built == 3
    with pytest.raises(RuntimeError, match="after the App has started"):
        app.add_middleware(Recorder, name="late", log=log)


class RecordsRecipients(Recorder):
    acts_on = (Rcpt,)


class RecordsEnvelope(Recorder):
    acts_on = (Mail, Rcpt)


async def test_middleware_that_acts_on_some_events_is_passed_by_at_the_others() -> None:
    log: list[str] = []
    app = recorded(
        log,
        (Recorder, "inner"),
        (RecordsRecipients, "rcpt"),
        (RecordsEnvelope, "envelope"),
        (Recorder, "outer"),
    )
    app.on_mail(lambda tx, sender: log.append("mail hook"))
    app.on_rcpt(lambda tx, rcpt: log.append("rcpt hook"))
    app.on_data(lambda tx, message: log.append("data hook"))
    everyone = ["outer", "inner", "/inner", "/outer"]

    async def seen(command: str, content: bytes = b"") -> list[str]:
        log.clear()
        reply = await (client.data(content) if command == "DATA" else client.command(command))
        assert reply.is_success, reply
        return log[:]

    async with TestClient(app) as client:
        await client.connect()
        assert log == everyone
        assert await seen("EHLO c.example.org") == everyone
        assert await seen("MAIL FROM:<a@example.org>") == [
            "outer", "envelope", "inner", "mail hook", "/inner", "/envelope", "/outer"
        ]  # fmt: skip
        assert await seen("RCPT TO:<b@example.com>") == [
            "outer", "envelope", "rcpt", "inner", "rcpt hook", "/inner", "/rcpt", "/envelope",
            "/outer",
        ]  # fmt: skip
        # The content's one chunk (DataChunk), then the whole message (Data).
        assert await seen("DATA", BODY) == [
            *everyone, "outer", "inner", "data hook", "/inner", "/outer"
        ]  # fmt: skip
    assert len(client.messages) == 1


class Unknown(Event):
    """An event class no stage has."""


async def test_an_event_of_another_class_meets_every_middleware_then_a_type_error() -> None:
    log: list[str] = []
    app = recorded(log, (RecordsRecipients, "rcpt"))
    session = Session(id=new_id(), hostname="mx", peer=("192.0.2.1", 1025), local=("::1", 25))
    async with app.serving():
        with pytest.raises(TypeError, match="not an event the App answers"):
            await app.handle(Unknown(session), raise_exceptions=True)
    assert log == ["rcpt"]


@pytest.mark.parametrize("acts_on", [Rcpt, (), (Rcpt, str), [Mail]])
async def test_a_malformed_acts_on_is_refused_when_the_middleware_is_added(acts_on: object) -> None:
    malformed = type("Malformed", (Recorder,), {"acts_on": acts_on})
    with pytest.raises(TypeError, match="acts_on must be a tuple of event classes"):
        App().add_middleware(malformed, name="x", log=[])


class DenyRecipients:
    """A middleware class as the README's "Writing middleware" describes one."""

    def __init__(self, app: Handler, *, denied: set[str]) -> None:
        self.app = app
        self.denied = {a.lower() for a in denied}

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Rcpt) and str(event.address).lower() in self.denied:
            return Reply(550, "5.1.1", "Mailbox unavailable")
        return await self.app(event)


async def test_middleware_rejecting_stops_the_event_before_the_hooks() -> None:
    app = App()
    hooked: list[Address] = []
    app.on_rcpt(lambda tx, rcpt: hooked.append(rcpt))
    app.add_middleware(DenyRecipients, denied={"Bad@Example.com"})
    async with TestClient(app) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        assert await client.rcpt("bad@example.com") == Reply(550, "5.1.1", "Mailbox unavailable")
        assert (await client.rcpt("good@example.com")).code == 250
    assert hooked == [Address("good", "example.com")]


class AdvertiseX:
    def __init__(self, app: Handler) -> None:
        self.app = app

    async def __call__(self, event: Event) -> Reply:
        reply = await self.app(event)
        if isinstance(event, Helo) and event.esmtp and reply.code == 250:
            return reply.with_extension("SIZE", "1024").with_extension("XCLIENT", "NAME")
        return reply


async def test_middleware_adjusts_the_ehlo_reply_rfc5321_4_1_1_1() -> None:
    app = App(hostname="mx.example.com")
    app.add_middleware(AdvertiseX)
    async with TestClient(app) as client:
        ehlo = await client.ehlo()
        assert ehlo.lines[0] == "mx.example.com"
        assert "XCLIENT NAME" in ehlo.lines
        assert [line for line in ehlo.lines if line.startswith("SIZE")] == ["SIZE 1024"]
        assert await client.helo() == Reply(250, None, "mx.example.com")


class SetsMaxSize:
    """Per-transaction limits set in MAIL are enforced by the engine while data streams."""

    def __init__(self, app: Handler, *, max_size: int) -> None:
        self.app = app
        self.max_size = max_size

    async def __call__(self, event: Event) -> Reply:
        reply = await self.app(event)
        if reply.code == 250 and hasattr(event, "transaction"):
            event.transaction.max_size = min(event.transaction.max_size, self.max_size)
        return reply


async def test_middleware_lowers_max_size_rfc1870() -> None:
    app = App()
    app.add_middleware(SetsMaxSize, max_size=100)
    async with TestClient(app) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        await client.rcpt("b@example.com")
        reply = await client.data(b"x" * 200 + b"\r\n")
        assert (reply.code, reply.status) == (552, "5.3.4")
        assert (await one_message(client)).code == 250


# -- errors -----------------------------------------------------------------------------------


async def test_hook_exception_is_logged_answered_451_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()

    @app.on_rcpt
    def fails(tx: Transaction, rcpt: Address) -> None:
        if rcpt.local_part == "boom":
            raise Boom("secret internal detail")

    async with TestClient(app, raise_server_exceptions=False) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        with caplog.at_level(logging.ERROR, logger="minismtp.app"):
            reply = await client.rcpt("boom@example.com")
        assert reply == LOCAL_ERROR
        assert reply == Reply(451, "4.3.0", "Requested action aborted: local error in processing")
        assert "secret" not in str(reply)
        assert (await client.rcpt("ok@example.com")).code == 250
        assert (await client.data(BODY)).code == 250
        assert (await one_message(client, ("boom@example.com",))).code == 451
        assert (await one_message(client)).code == 250
    records = [r for r in caplog.records if r.name == "minismtp.app" and r.exc_info]
    assert [r.exc_info[0] for r in records if r.exc_info] == [Boom, Boom]
    assert len(client.messages) == 2


class FailsOnMail:
    def __init__(self, app: Handler) -> None:
        self.app = app

    async def __call__(self, event: Event) -> Reply:
        if type(event).__name__ == "Mail":
            raise Boom("middleware bug")
        return await self.app(event)


async def test_middleware_exception_is_answered_451() -> None:
    app = App()
    app.add_middleware(FailsOnMail)
    async with TestClient(app, raise_server_exceptions=False) as client:
        await client.ehlo()
        assert await client.mail("a@example.org") == LOCAL_ERROR
        assert await client.rcpt("b@example.com") == Reply(503, "5.5.1", "Error: need MAIL command")


async def test_app_call_never_raises_but_raise_mode_does() -> None:
    app = App()
    app.on_connect(lambda session: 1 / 0)  # type: ignore[type-var]
    event = Connect(Session())
    assert await app(event) == LOCAL_ERROR
    with pytest.raises(ZeroDivisionError):
        await app.handle(event, raise_exceptions=True)


async def test_answers_given_at_once_only_where_nothing_is_on_the_way() -> None:
    """``answer_now`` answers a stage without hooks that no middleware acts on, as
    ``handle`` would; else it leaves the event to ``handle`` (None)."""
    app = App()
    app.add_middleware(FailsOnMail)  # acts on every event: nothing is answered at once
    session = Session()
    sender = Address("a", "example.org")
    mail = Mail(session, Transaction(session, sender), sender, {})
    assert app.answer_now(mail) is None
    bare = App()
    assert bare.answer_now(mail) == await bare.handle(mail) == Reply(250, "2.1.0", "OK")
    assert bare.answer_now(Connect(session)) is None  # the greeting's hooks may wait
    bare.on_mail(lambda tx, sender: None)
    assert bare.answer_now(mail) is None  # a hook added after the first event counts


async def test_a_bug_in_an_answer_given_at_once_is_raised_into_the_test() -> None:
    app = App()

    def build_message(session: Session, tx: Transaction) -> Message:
        raise Boom("spool bug")

    app.build_message = build_message  # type: ignore[method-assign]
    with pytest.raises(Boom, match="spool bug"):
        async with TestClient(app) as client:
            await one_message(client)
    async with TestClient(app, raise_server_exceptions=False) as client:
        assert (await one_message(client)) == LOCAL_ERROR
    assert app.metrics.hook_errors == 1


async def test_raise_mode_puts_the_exception_in_the_test_and_the_session_goes_on() -> None:
    app = App()

    @app.on_rcpt
    async def fails(tx: Transaction, rcpt: Address) -> None:
        if rcpt.local_part == "boom":
            raise Boom("hook bug")

    async with TestClient(app) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        with pytest.raises(Boom, match="hook bug"):
            await client.rcpt("boom@example.com")
        assert await client.rcpt("ok@example.com") == Reply(250, "2.1.5", "OK")
        assert (await client.data(BODY)).code == 250


# -- the hand-over and the message ------------------------------------------------------------

RECEIVED = re.compile(
    rb"Received: from (?P<helo>\S+) \(\[(?P<ip>[^]]+)\]\)\r\n"
    rb"\tby (?P<by>\S+) with (?P<proto>[A-Z0-9]+) id (?P<id>[0-9A-F]+)"
    rb"(?:\r\n\tfor <(?P<rcpt>[^>]+)>)?; (?P<date>[^\r\n]+)\r\n"
)


async def test_rfc5321_4_4_received_header_is_prepended() -> None:
    app = App(hostname="mx.example.com")
    async with TestClient(app, peer=("192.0.2.9", 2525)) as client:
        await client.ehlo("client.example.org")
        await one_message(client)
        await client.helo("old.example.org")
        await one_message(client, ("a@example.com", "b@example.com"))
    first, second = client.messages
    match = RECEIVED.match(first.data)
    assert match is not None, first.data
    assert match["helo"] == b"client.example.org" and match["ip"] == b"192.0.2.9"
    assert match["by"] == b"mx.example.com" and match["proto"] == b"ESMTP"
    assert match["id"].decode() == first.id and match["rcpt"] == b"bob@example.com"
    assert first.data == match[0] + BODY and first.original == BODY
    match = RECEIVED.match(second.data)
    assert match is not None and match["proto"] == b"SMTP" and match["rcpt"] is None


async def test_rfc3207_received_says_esmtps_after_starttls() -> None:
    async with TestClient(App(), tls=True) as client:
        await client.ehlo()
        assert (await client.starttls()).code == 220
        assert client.session.tls is not None
        await one_message(client)
    assert b" with ESMTPS id " in client.messages[0].data
    assert client.messages[0].tls == client.session.tls


async def test_message_fields_and_unique_ids() -> None:
    app = App()
    async with TestClient(app) as client:
        await client.ehlo("c.example.org")
        for _ in range(20):
            await client.send_message("alice@example.org", ["b@example.com", "c@example.com"], BODY)
    ids = [m.id for m in client.messages]
    assert len(set(ids)) == 20 and ids == sorted(ids)
    message = client.messages[0]
    assert message.mail_from == Address("alice", "example.org")
    assert message.rcpt_to == (Address("b", "example.com"), Address("c", "example.com"))
    assert message.peer == ("127.0.0.1", 54321) and message.helo_name == "c.example.org"
    many = {new_id() for _ in range(10_000)}
    assert len(many) == 10_000


async def test_accepted_messages_wait_on_app_messages_without_consumers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    with caplog.at_level(logging.DEBUG, logger="minismtp.app"):
        async with TestClient(app) as client:
            for _ in range(3):
                await one_message(client)
    received = [app.messages.receive_nowait() for _ in range(3)]
    assert received == client.messages
    with pytest.raises(anyio.EndOfStream):
        app.messages.receive_nowait()
    lines = [r.getMessage() for r in caplog.records if r.name == "minismtp.app"]
    assert len(lines) == 3
    assert lines[0] == (
        f"accepted {received[0].id} peer=127.0.0.1 helo=localhost from=<alice@example.org> "
        f"to=<bob@example.com> size={len(BODY)}"
    )


async def test_on_message_consumers_drain_everything_accepted_on_exit() -> None:
    app = App()
    gate = anyio.Event()
    consumed: list[str] = []
    also: list[str] = []

    @app.on_message
    async def slow(message: Message) -> None:
        await gate.wait()
        consumed.append(message.id)

    @app.on_message
    def second(message: Message) -> None:
        also.append(message.id)

    events: list[str] = []
    app.on_startup(lambda: events.append("startup"))

    @app.on_shutdown
    async def shutdown() -> None:
        events.append(f"shutdown after {len(consumed)}")

    with anyio.fail_after(5):
        async with TestClient(app) as client:
            for _ in range(25):
                assert (await one_message(client)).code == 250
            assert consumed == []  # the consumer is held at the gate
            gate.set()
    ids = [m.id for m in client.messages]
    assert consumed == ids and also == ids
    assert events == ["startup", "shutdown after 25"]


async def test_app_serves_again_after_a_serving_period_ends() -> None:
    app = App()
    got: list[Message] = []
    app.on_message(got.append)
    for _ in range(2):
        async with TestClient(app) as client:
            await one_message(client)
    assert len(got) == 2


async def test_serving_twice_at_once_is_an_error() -> None:
    app = App()
    async with app.serving():
        with pytest.raises(RuntimeError, match="serving already"):
            async with app.serving():
                pass


async def test_on_message_exception_is_logged_or_raised_on_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    done: list[str] = []

    @app.on_message
    def flaky(message: Message) -> None:
        if not done:
            done.append("failed once")
            raise Boom("consumer bug")
        done.append(message.id)

    with caplog.at_level(logging.ERROR, logger="minismtp.app"):
        async with TestClient(app, raise_server_exceptions=False) as client:
            await one_message(client)
            await one_message(client)
    assert done == ["failed once", client.messages[1].id]
    assert any(r.exc_info and r.exc_info[0] is Boom for r in caplog.records)
    done.clear()
    with pytest.raises(Boom, match="consumer bug"):
        async with TestClient(app) as client:
            await one_message(client)


async def test_exception_in_the_test_body_is_not_wrapped_in_a_group() -> None:
    app = App()
    app.on_message(lambda message: None)
    with pytest.raises(KeyError):
        async with TestClient(app):
            raise KeyError("from the test")


async def test_handing_over_to_a_closed_channel_is_answered_451(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    app.messages.close()  # nobody will ever read: the hand-over must not pretend it worked
    client = TestClient(app)
    with caplog.at_level(logging.ERROR, logger="minismtp.app"):
        assert await one_message(client) == LOCAL_ERROR
    assert client.messages == []
    assert "could not hand over" in caplog.text


# -- Maildir ----------------------------------------------------------------------------------


async def test_maildir_stores_the_message_byte_exact_before_the_250(tmp_path: Path) -> None:
    app = App(hostname="mx.example.com", maildir=tmp_path / "inbound")
    async with TestClient(app) as client:
        reply = await one_message(client)
        assert reply.code == 250
        [stored] = list((tmp_path / "inbound" / "new").iterdir())
        assert list((tmp_path / "inbound" / "tmp").iterdir()) == []
        assert (tmp_path / "inbound" / "cur").is_dir()
    message = client.messages[0]
    assert reply.text == f"OK queued as {message.id}"
    assert stored.read_bytes() == message.data
    match = RECEIVED.match(message.data)
    assert match is not None and match["id"].decode() == message.id
    assert message.data == match[0] + BODY
    # No on_message consumers: the Maildir is the destination, nothing piles up in memory.
    with pytest.raises(anyio.EndOfStream):
        app.messages.receive_nowait()


async def test_maildir_with_consumers_notifies_them_too(tmp_path: Path) -> None:
    app = App(maildir=tmp_path)
    got: list[Message] = []
    app.on_message(got.append)
    async with TestClient(app) as client:
        await one_message(client)
    assert got == client.messages
    assert [p.read_bytes() for p in (tmp_path / "new").iterdir()] == [got[0].data]


async def test_maildir_write_failure_is_answered_451_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(maildir=tmp_path)
    async with TestClient(app) as client:  # raise mode: a full disk is not a bug to raise
        (tmp_path / "tmp").rmdir()
        with caplog.at_level(logging.ERROR, logger="minismtp.app"):
            assert await one_message(client) == LOCAL_ERROR
        assert client.messages == []
        assert list((tmp_path / "new").iterdir()) == []
        (tmp_path / "tmp").mkdir()
        assert (await one_message(client)).code == 250  # the session goes on
    assert "could not hand over" in caplog.text
    assert len(list((tmp_path / "new").iterdir())) == 1


async def test_default_app_stores_every_message_in_the_maildir(tmp_path: Path) -> None:
    app = default_app(tmp_path / "maildir", hostname="mx.test")
    assert app.hostname == "mx.test"
    async with TestClient(app) as client:
        await one_message(client)
        await one_message(client, ("a@example.com", "b@example.com"))
    stored = sorted(p.read_bytes() for p in (tmp_path / "maildir" / "new").iterdir())
    assert stored == sorted(m.data for m in client.messages)
    assert default_app().maildir is not None


async def test_the_app_is_a_handler_that_middleware_can_wrap_directly() -> None:
    """DESIGN.md: a handler is async (event) -> Reply, and the App is one."""
    app = App()
    handler: Handler = DenyRecipients(app, denied={"x@example.com"})
    session = Session()
    tx = Transaction(session, Address("a", "example.org"))
    refused = await handler(Rcpt(session, tx, Address("x", "example.com"), {}))
    accepted = await handler(Rcpt(session, tx, Address("y", "example.com"), {}))
    assert (refused.code, accepted) == (550, Reply(250, "2.1.5", "OK"))


def test_the_queued_reply_is_the_reply_its_fields_make() -> None:
    """Built without the validators (it is made for every message): equal to the checked one,
    on the wire, in its repr and its hash."""
    message_id = new_id()
    checked = Reply(250, "2.0.0", f"OK queued as {message_id}")
    built = queued_reply(message_id)
    assert built == checked and hash(built) == hash(checked) and repr(built) == repr(checked)
    assert bytes(built) == bytes(checked) == f"250 2.0.0 OK queued as {message_id}\r\n".encode()
