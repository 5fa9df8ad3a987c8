"""The in-memory TestClient and the reply parser; examples/hello.py through it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minismtp.app import LOCAL_ERROR, App
from minismtp.testing import TEST_TLS, SessionClosed, TestClient, dot_stuff, parse_replies
from minismtp.types import Address, Message, Reply, Session

pytestmark = pytest.mark.anyio

BODY = b"Subject: t\r\n\r\nbody\r\n"


# -- parse_replies (RFC 5321 4.2, RFC 3463) --------------------------------------------------


def test_rfc5321_4_2_single_and_multiline_replies() -> None:
    data = b"220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n250 2.1.0 OK\r\n"
    assert parse_replies(data) == [
        Reply(220, None, "mx ESMTP"),
        Reply(250, None, ("mx", "PIPELINING", "SIZE 10")),
        Reply(250, "2.1.0", "OK"),
    ]


def test_rfc3463_enhanced_code_split_off_every_line_of_a_multiline_reply() -> None:
    data = b"550-5.7.1 first\r\n550 5.7.1 second\r\n"
    assert parse_replies(data) == [Reply(550, "5.7.1", ("first", "second"))]


def test_rfc3463_code_of_another_class_or_not_on_every_line_stays_text() -> None:
    assert parse_replies(b"250 5.1.1 odd\r\n") == [Reply(250, None, "5.1.1 odd")]
    assert parse_replies(b"550-5.7.1 a\r\n550 b\r\n") == [Reply(550, None, ("5.7.1 a", "b"))]
    assert parse_replies(b"250 2.0.0\r\n") == [Reply(250, "2.0.0", "")]


def test_rfc5321_4_2_reply_code_without_text() -> None:
    assert parse_replies(b"250\r\n354 \r\n") == [Reply(250, None, ""), Reply(354, None, "")]


@pytest.mark.parametrize(
    "data",
    [b"250 OK", b"hello\r\n", b"250-a\r\n", b"250-a\r\n550 b\r\n", b"25 x\r\n", b"600 x\r\n"],
)
def test_malformed_replies_raise(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_replies(data)


_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r\n"), max_size=20
).filter(lambda line: not line[:1].isdigit())


@given(
    st.integers(200, 599),
    st.booleans(),
    st.lists(_TEXT, min_size=1, max_size=4),
)
def test_parse_replies_inverts_reply_bytes(code: int, with_status: bool, lines: list[str]) -> None:
    status = f"{code // 100}.1.{code % 10}" if with_status and code // 100 != 3 else None
    reply = Reply(code, status, lines[0] if len(lines) == 1 else tuple(lines))
    assert parse_replies(bytes(reply)) == [reply]


def test_rfc5321_4_5_2_dot_stuffing() -> None:
    assert dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert dot_stuff(b"no final newline") == b"no final newline\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


# -- the client -------------------------------------------------------------------------------


async def test_connect_is_implicit_and_explicit() -> None:
    client = TestClient(App(hostname="mx.test"))
    assert (await client.ehlo()).lines[0] == "mx.test"
    assert client.greeting == Reply(220, None, "mx.test ESMTP")
    with pytest.raises(RuntimeError, match="already connected"):
        await client.connect()


async def test_raw_returns_every_reply_of_a_pipelined_batch_rfc2920() -> None:
    async with TestClient(App()) as client:
        await client.ehlo()
        replies = await client.raw(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<bad>\r\nDATA\r\n"
        )
        assert [(r.code, r.status) for r in replies] == [
            (250, "2.1.0"),
            (250, "2.1.5"),
            (501, "5.1.3"),
            (354, None),
        ]
        [final] = await client.raw(b"..dot\r\n.\r\n")
    assert final.code == 250
    assert client.messages[0].original == b".dot\r\n"


async def test_data_refused_before_354_returns_the_refusal() -> None:
    async with TestClient(App()) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        assert await client.data(BODY) == Reply(554, "5.5.1", "Error: no valid recipients")
        assert client.messages == []


async def test_data_round_trips_dot_lines_byte_exact() -> None:
    content = b".leading\r\n.\r\n..two\r\nend\r\n"
    async with TestClient(App()) as client:
        [*_, final] = await client.send_message("a@example.org", "b@example.com", content)
    assert final.code == 250
    assert client.messages[0].original == content


async def test_rfc3030_bdat_chunks_make_one_message() -> None:
    async with TestClient(App()) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        await client.rcpt("b@example.com")
        assert await client.bdat(b"Subject: t\r\n") == Reply(250, "2.0.0", "12 octets received")
        assert (await client.bdat(b"\r\nbody\r\n", last=True)).code == 250
    assert client.messages[0].original == b"Subject: t\r\n\r\nbody\r\n"


async def test_rset_noop_quit_and_a_new_session() -> None:
    async with TestClient(App()) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        assert await client.rset() == Reply(250, "2.0.0", "OK")
        assert (await client.mail("a@example.org")).code == 250  # RSET ended the transaction
        assert await client.noop() == Reply(250, "2.0.0", "OK")
        first = client.session
        assert await client.quit() == Reply(221, "2.0.0", "Bye")
        assert not client.connected
        with pytest.raises(SessionClosed):
            await client.noop()
        await client.connect()
        assert client.session is not first
        assert (await one(client)).code == 250


async def one(client: TestClient) -> Reply:
    return (await client.send_message("a@example.org", ["b@example.com"], BODY))[-1]


async def test_send_message_stops_when_no_recipient_is_accepted() -> None:
    app = App()
    app.on_rcpt(lambda tx, rcpt: Reply(550, "5.1.1", "No") if rcpt.domain == "x.test" else None)
    async with TestClient(app) as client:
        replies = await client.send_message("a@example.org", ["u@x.test", "v@x.test"], BODY)
        assert [r.code for r in replies] == [250, 550, 550]
        replies = await client.send_message("a@example.org", ["u@x.test", "ok@y.test"], BODY)
        assert [r.code for r in replies] == [250, 550, 250, 250]
    assert client.messages[0].rcpt_to == (Address("ok", "y.test"),)


async def test_client_vanishing_in_data_leaves_no_message() -> None:
    async with TestClient(App()) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        await client.rcpt("b@example.com")
        [go] = await client.raw(b"DATA\r\nSubject: half\r\n")
        assert go.code == 354
        assert await client.disconnect() == []
        assert not client.connected
    assert client.messages == []


async def test_rfc3207_starttls_in_memory_resets_the_session() -> None:
    async with TestClient(App(), tls=True) as client:
        assert "STARTTLS" in (await client.ehlo()).lines
        assert await client.starttls() == Reply(220, "2.0.0", "Ready to start TLS")
        assert client.session.tls == TEST_TLS
        assert (await client.mail("a@example.org")).code == 503  # needs a new EHLO
        assert "STARTTLS" not in (await client.ehlo()).lines


async def test_without_tls_starttls_is_not_available() -> None:
    async with TestClient(App()) as client:
        await client.ehlo()
        assert (await client.starttls()).code == 502


async def test_peer_is_what_the_app_sees() -> None:
    app = App()
    peers: list[tuple[str, int]] = []
    app.on_connect(lambda session: peers.append(session.peer))
    async with TestClient(app, peer=("2001:db8::5", 1234)) as client:
        await one(client)
    assert peers == [("2001:db8::5", 1234)]
    assert b"([IPv6:2001:db8::5])" in client.messages[0].data


async def test_raise_server_exceptions_false_shows_the_451() -> None:
    app = App()

    @app.on_mail
    def broken(tx: object, sender: Address) -> None:
        raise RuntimeError("bug")

    async with TestClient(app, raise_server_exceptions=False) as client:
        await client.ehlo()
        assert await client.mail("a@example.org") == LOCAL_ERROR
    async with TestClient(app) as client:
        await client.ehlo()
        with pytest.raises(RuntimeError, match="bug"):
            await client.mail("a@example.org")
        # The exception is not also shown as a stale 451 on the next command.
        assert await client.noop() == Reply(250, "2.0.0", "OK")


async def test_lifespan_runs_only_as_a_context_manager() -> None:
    app = App()
    events: list[str] = []
    app.on_startup(lambda: events.append("startup"))
    app.on_shutdown(lambda: events.append("shutdown"))
    client = TestClient(app)
    await one(client)
    assert events == []
    async with TestClient(app) as client:
        assert events == ["startup"]
        await one(client)
    assert events == ["startup", "shutdown"]


async def test_two_clients_on_one_app_see_only_their_own_messages() -> None:
    app = App()
    async with app.serving():
        first, second = TestClient(app), TestClient(app, peer=("192.0.2.2", 1))
        await one(first)
        await one(second)
        await one(first)
    assert [m.peer for m in first.messages] == [("127.0.0.1", 54321)] * 2
    assert [m.peer for m in second.messages] == [("192.0.2.2", 1)]


async def test_command_returns_the_closing_421_after_too_many_errors() -> None:
    """RFC 5321 4.5.3.1 limits: the engine closes with 421 4.7.0 after max_errors."""
    from minismtp.protocol import Limits

    async with TestClient(App(limits=Limits(max_errors=2))) as client:
        assert (await client.command("BOGUS")).code == 500
        assert (await client.command("BOGUS")).code == 421
        assert not client.connected


# -- examples/hello.py ------------------------------------------------------------------------


async def test_foreign_domain_is_refused() -> None:
    """examples/hello.py refuses a recipient outside example.com."""
    from examples.hello import app

    async with TestClient(app) as client:
        await client.ehlo("test.example.org")
        await client.mail("a@example.org")
        reply = await client.rcpt("b@elsewhere.org")
        assert reply.code == 550


async def test_hello_example_accepts_example_com_and_prints_each_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from examples.hello import app

    async with TestClient(app) as client:
        replies = await client.send_message("a@example.org", ["b@example.com"], BODY)
        assert [r.code for r in replies] == [250, 250, 250]
        await client.mail("a@example.org")
        assert (await client.rcpt("c@elsewhere.org")) == Reply(550, "5.7.1", "Relay access denied")
    [message] = client.messages
    assert isinstance(message, Message)
    out = capsys.readouterr().out
    # Plain addresses (Address.__str__), as a user wants to read them.
    assert out == f"{message.id} a@example.org b@example.com {len(message.data)}\n"
    assert message.data.startswith(b"Received: from localhost ([127.0.0.1])\r\n\tby mx.example.com")


def test_test_client_is_not_collected_as_a_test_class() -> None:
    assert TestClient.__test__ is False
    assert isinstance(Session(), Session)


async def test_middleware_and_the_client_see_the_accepted_message_on_the_transaction() -> None:
    """The public way to observe what the App accepted: ``transaction.message`` once the Data
    event is answered with ``transaction.message_id`` set (the test client reads it the same
    way); a message refused or discarded has no id."""
    from minismtp.events import Data, Event, Handler

    seen: list[Message] = []

    class Observe:
        def __init__(self, app: Handler) -> None:
            self.app = app

        async def __call__(self, event: Event) -> Reply:
            reply = await self.app(event)
            if isinstance(event, Data) and event.transaction.message_id is not None:
                seen.append(event.transaction.message)
            return reply

    app = App()
    app.add_middleware(Observe)
    app.on_data(
        lambda tx, message: Reply(250, "2.0.0", "Discarded") if b"drop" in message.data else None
    )
    async with TestClient(app) as client:
        await one(client)
        assert (await client.send_message("a@example.org", "b@example.com", b"drop\r\n"))[
            -1
        ].code == 250
    assert seen == client.messages and len(seen) == 1
    assert app.messages.receive_nowait() is seen[0]
