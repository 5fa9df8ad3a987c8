"""The server's INFO line per mail transaction (logger ``minismtp.server``): every field, for
each way a transaction ends, and what the client chose written so that it cannot forge a line
or reach the operator's terminal."""

from __future__ import annotations

import logging
import re

import anyio
import attrs
import pytest

from minismtp.app import App
from minismtp.server import Server
from minismtp.types import Address, Reply, Transaction
from tests.helpers.clients import Connect, WireClient

pytestmark = pytest.mark.anyio

BODY = b"Subject: logged\r\n\r\nHello.\r\n"


@pytest.fixture
def app() -> App:
    app = App(hostname="mx.test")

    @app.on_rcpt
    async def only_example_com(tx: Transaction, rcpt: Address) -> Reply | None:
        if rcpt.domain != "example.com":
            return Reply(550, "5.7.1", "Relay access denied")
        return None

    @app.on_data
    async def no_spam(tx: Transaction, _: object) -> Reply | None:
        if tx.mail_from.local_part == "spammer":
            return Reply(554, "5.7.1", "Looks like spam")
        return None

    return app


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "minismtp.server"]


async def open_transaction(
    client: WireClient, helo: str, *rcpts: str, sender: str = "a@example.org"
) -> list[str]:
    assert (await client.reply()).startswith("220")
    assert (await client.command(f"HELO {helo}")).startswith("250")
    assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
    return [await client.command(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]


async def send_data(client: WireClient, content: bytes) -> str:
    assert (await client.command("DATA")).startswith("354")
    await client.send(content + b".\r\n")
    return await client.reply()


FIELDS = (
    r"session (?P<session>[0-9A-Z]+) from 127\.0\.0\.1 helo=(?P<helo>\S*) "
    r"from=<(?P<sender>\S*)> to=(?P<to>\S*)(?: refused=(?P<refused>\S+))? size=(?P<size>\d+) "
    r"reply=(?P<reply>\d{3}|abandoned)(?: reason=\"(?P<reason>[^\"]*)\")? "
    r"id=(?P<id>[0-9A-Z]+|-) duration=\d+\.\d{3}s"
)


@attrs.frozen
class Line:
    helo: str
    sender: str
    to: str
    refused: str | None
    size: int
    reply: str
    reason: str | None
    id: str


def parse(line: str) -> Line:
    match = re.fullmatch(FIELDS, line)
    assert match, line
    fields = match.groupdict()
    del fields["session"]
    return Line(**{**fields, "size": int(fields["size"])})


async def test_accepted_message_every_field(
    server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minismtp.server")
    async with connect(server.port) as client:
        await open_transaction(client, "client.test", "b@example.com")
        reply = await send_data(client, BODY)
        assert reply.startswith("250 2.0.0 OK queued as ")
        (line,) = lines(caplog)
    assert parse(line) == Line(
        "client.test",
        "a@example.org",
        "<b@example.com>",
        None,
        len(BODY),
        "250",
        None,
        reply.split()[-1],
    )


async def test_each_refused_recipient_with_its_code(
    server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minismtp.server")
    async with connect(server.port) as client:
        await open_transaction(
            client, "client.test", "b@example.com", "c@elsewhere.test", "d@example.com"
        )
        assert (await send_data(client, BODY)).startswith("250")
        (line,) = lines(caplog)
    logged = parse(line)
    assert (logged.to, logged.refused, logged.reply) == (
        "<b@example.com>,<d@example.com>",
        "<c@elsewhere.test>:550",
        "250",
    )


async def test_every_recipient_refused_then_quit_is_abandoned_with_the_refusals(
    server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 20: this was ``to= size=0 reply=abandoned``, and nothing said why."""
    caplog.set_level(logging.INFO, logger="minismtp.server")
    async with connect(server.port) as client:
        await open_transaction(client, "client.test", "c@elsewhere.test", "d@elsewhere.test")
        assert (await client.command("QUIT")).startswith("221")
        (line,) = lines(caplog)
    logged = parse(line)
    assert (logged.to, logged.refused, logged.size, logged.reply, logged.id) == (
        "",
        "<c@elsewhere.test>:550,<d@elsewhere.test>:550",
        0,
        "abandoned",
        "-",
    )


async def test_message_too_big_gives_the_reason_and_the_size_it_reached_rfc5321_4_5_3_1_10(
    app: App, server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minismtp.server")
    app.limits = attrs.evolve(app.limits, max_message_size=1000)
    async with connect(server.port) as client:
        await open_transaction(client, "client.test", "b@example.com")
        reply = await send_data(client, BODY + (b"x" * 70 + b"\r\n") * 50)
        assert reply.startswith("552 5.3.4")
        (line,) = lines(caplog)
    logged = parse(line)
    assert (
        logged.reply == "552"
        and logged.reason == "5.3.4 Message size exceeds fixed maximum message size"
    )
    assert logged.size > 1000  # how far it got, not 0


async def test_bare_lf_refusal_gives_the_reason(
    server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minismtp.server")
    async with connect(server.port) as client:
        await open_transaction(client, "client.test", "b@example.com")
        assert (await send_data(client, b"Subject: lf\n\nbare\n\r\n")).startswith("550 5.5.2")
        (line,) = lines(caplog)
    logged = parse(line)
    assert (logged.reply, logged.reason) == ("550", "5.5.2 Message contains bare CR or LF")


async def test_app_refusal_of_the_content_gives_its_reason(
    server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minismtp.server")
    async with connect(server.port) as client:
        await open_transaction(client, "client.test", "b@example.com", sender="spammer@example.org")
        content = b"Subject: spam\r\n\r\nspam\r\n"
        assert (await send_data(client, content)).startswith("554 5.7.1")
        (line,) = lines(caplog)
    logged = parse(line)
    assert (logged.size, logged.reply, logged.reason) == (
        len(content),
        "554",
        "5.7.1 Looks like spam",
    )


async def test_control_characters_and_spaces_from_the_client_are_escaped(
    server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 20: ``HELO a<NUL><ESC>[31mred<BEL>`` was written raw into the log line."""
    caplog.set_level(logging.INFO, logger="minismtp.server")
    async with connect(server.port) as client:
        assert (await client.reply()).startswith("220")
        await client.send(b"HELO a\x00\x1b[31mred\x07 x\\y\r\n")
        assert (await client.reply()).startswith("250")
        assert (await client.command('MAIL FROM:<"a\\ b"@example.org>')).startswith("250")
        assert (await client.command("RSET")).startswith("250")
        (line,) = lines(caplog)
    assert line.isprintable()
    logged = parse(line)
    assert logged.helo == r"a\x00\x1b[31mred\x07\x20x\x5cy"
    assert logged.sender == r'"a\x5c\x20b"@example.org'


class Logged(logging.Handler):
    """Sets ``event`` when a record comes (emitted on the event loop's thread)."""

    def __init__(self, event: anyio.Event) -> None:
        super().__init__()
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


async def test_a_lost_connection_logs_the_refusals_of_its_open_transaction(
    server: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minismtp.server")
    logged_line = anyio.Event()
    handler = Logged(logged_line)
    logging.getLogger("minismtp.server").addHandler(handler)
    try:
        async with connect(server.port) as client:
            await open_transaction(client, "client.test", "c@elsewhere.test", "b@example.com")
        with anyio.fail_after(10):  # logged once the server has seen the connection end
            await logged_line.wait()
    finally:
        logging.getLogger("minismtp.server").removeHandler(handler)
    (line,) = lines(caplog)
    logged = parse(line)
    assert (logged.to, logged.refused, logged.reply) == (
        "<b@example.com>",
        "<c@elsewhere.test>:550",
        "abandoned",
    )
