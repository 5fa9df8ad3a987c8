"""Drive an App through whole SMTP dialogues in memory, without a socket.

::

    from minismtp.testing import TestClient

    async def test_foreign_domain_is_refused():
        async with TestClient(app) as client:
            await client.ehlo("test.example.org")
            await client.mail("a@example.org")
            reply = await client.rcpt("b@elsewhere.org")
            assert reply.code == 550

Each session runs on the server's own connection driver over an in-memory wire, so a test
sees exactly the bytes a real client would, parsed into :class:`Reply` objects.
Like Starlette's ``TestClient``, an exception raised by a hook or middleware is raised in the
test (``raise_server_exceptions=False`` shows the ``451`` a client would get instead), and
``async with`` runs the App's serving period: startup and shutdown hooks, ``on_message``
consumers, which have drained every accepted message when the block ends.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Coroutine, Generator, Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, ClassVar

import attrs

from minismtp.app import LOCAL_ERROR, App
from minismtp.config import ServerConfig
from minismtp.connection import Connection
from minismtp.events import Data, Event
from minismtp.metrics import Metrics
from minismtp.protocol import Limits
from minismtp.suspended import Suspended
from minismtp.tls import TLSConfig
from minismtp.types import Message, Reply, Session, TLSInfo

__all__ = ["MemoryWire", "SessionClosed", "TestClient", "parse_replies"]

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
_STATUS = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")

#: What the in-memory "handshake" records on the session when the client does STARTTLS.
TEST_TLS = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384")


def _reply(code: int, lines: list[str]) -> Reply:
    status = None
    match = _STATUS.match(lines[0])
    # RFC 3463: the class of the enhanced code is the first digit of the reply code; and in
    # a multi-line reply every line repeats it.
    if match and match[1][0] == str(code)[0]:
        prefix = match[1]
        if all(line == prefix or line.startswith(prefix + " ") for line in lines):
            status = prefix
            lines = [line[len(prefix) + 1 :] for line in lines]
    return Reply(code, status, lines[0] if len(lines) == 1 else tuple(lines))


def parse_replies(data: bytes) -> list[Reply]:
    """The replies in ``data`` (RFC 5321 4.2), multi-line ones joined, enhanced codes split off.

    Raises ValueError for bytes that are not complete, well-formed replies.
    """
    if data and not data.endswith(b"\r\n"):
        raise ValueError(f"incomplete reply: {data[-80:]!r}")
    replies: list[Reply] = []
    code: int | None = None
    lines: list[str] = []
    for raw in data.split(b"\r\n")[:-1]:
        match = _REPLY_LINE.fullmatch(raw)
        if match is None:
            raise ValueError(f"not a reply line: {raw!r}")
        line_code = int(match[1])
        if code is not None and line_code != code:
            raise ValueError(f"reply code changes inside a multi-line reply: {raw!r}")
        code = line_code
        lines.append((match[3] or b"").decode("utf-8", "replace"))
        if match[2] != b"-":
            replies.append(_reply(code, lines))
            code, lines = None, []
    if lines:
        raise ValueError("unfinished multi-line reply")
    return replies


def _path(address: str) -> str:
    return address if address.startswith("<") else f"<{address}>"


def dot_stuff(content: bytes) -> bytes:
    """``content`` as sent after DATA: lines starting with a dot doubled, ``CRLF.CRLF`` added.

    A message that does not end with CRLF gets one, as ``smtplib`` does (RFC 5321 4.5.2).
    """
    if content.startswith(b"."):
        content = b"." + content
    content = content.replace(b"\r\n.", b"\r\n..")
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content + b".\r\n"


class SessionClosed(Exception):
    """The server closed the session; there is nothing more to say to it."""


class _Park:
    """What the in-memory wire's read awaits when it has nothing: the test client's turn."""

    def __await__(self) -> Generator[Any, None, None]:
        yield self


_PARK = _Park()


@attrs.define(eq=False)
class MemoryWire:
    """The test client's wire: the client's bytes handed over in memory, the replies
    collected. A read with nothing to give parks the connection's driver, which hands control
    back to the test (see :meth:`TestClient.raw`)."""

    _incoming: list[bytes] = attrs.field(factory=list)  # b"" is the client's EOF
    _sent: list[bytes] = attrs.field(factory=list)

    def feed(self, data: bytes) -> None:
        self._incoming.append(data)

    def take_sent(self) -> bytes:
        sent, self._sent = b"".join(self._sent), []
        return sent

    async def receive(self) -> bytes:
        while not self._incoming:
            await _PARK
        return self._incoming.pop(0)

    async def send(self, data: bytes) -> None:
        self._sent.append(data)

    def write_nowait(self, data: bytes) -> bool:
        self._sent.append(data)
        return True

    def unread(self, data: bytes) -> None:
        self._incoming.insert(0, data)

    async def start_tls(self, tls: TLSConfig) -> TLSInfo:
        return TEST_TLS

    async def aclose(self) -> None:
        pass


@attrs.define(eq=False)
class _Answers:
    """The App as the test client's connections see it: exceptions kept for the test, and
    each message the App accepted noted on the client."""

    client: TestClient

    @property
    def hostname(self) -> str:
        return self.client.app.hostname

    @property
    def limits(self) -> Limits:
        return self.client.app.limits

    async def __call__(self, event: Event) -> Reply:
        client = self.client
        try:
            reply = await client.app.handle(event, raise_exceptions=client.raise_server_exceptions)
        except Exception as exc:
            return self._raised(exc)
        if isinstance(event, Data) and 200 <= reply.code < 300:
            transaction = event.transaction
            if transaction.message_id is not None and transaction.message is not None:
                client.messages.append(transaction.message)
        return reply

    def answer_now(self, event: Event) -> Reply | None:
        client = self.client
        try:
            return client.app.answer_now(event, raise_exceptions=client.raise_server_exceptions)
        except Exception as exc:
            return self._raised(exc)

    def _raised(self, exc: Exception) -> Reply:
        # Answered as the server would, so that the test may go on with this session;
        # the test gets the exception instead of the 451 (TestClient._drive).
        self.client._raised.append(exc)
        return LOCAL_ERROR


@attrs.define(eq=False)
class _Host:
    """What the connection driver needs of a server, for the test client's sessions."""

    app: _Answers
    # The in-memory handshake needs no certificate: anything but None offers STARTTLS.
    tls: Any = None
    config: ServerConfig = attrs.field(factory=ServerConfig)
    metrics: Metrics = attrs.field(factory=Metrics)
    require_tls: bool = False
    stopping: bool = False

    @property
    def idle_timeout(self) -> float:
        return self.config.idle_timeout

    def track(self, connection: Connection) -> None:
        pass

    def untrack(self, connection: Connection) -> None:
        pass


@attrs.define(eq=False)
class TestClient:
    """An in-memory SMTP client for ``app``; see the module docstring.

    ``peer`` is the client address the App sees. ``tls`` offers STARTTLS, which then
    "succeeds" at once, recording :data:`TEST_TLS` on the session. Every message the App
    accepts in this client's sessions is appended to :attr:`messages`. ``lmtp``: the sessions
    are LMTP (RFC 2033): greet with :meth:`lhlo`; after the data come one reply per accepted
    recipient (:meth:`data_replies`, :meth:`send_message`).

    Each session is served by the server's own connection driver
    (:class:`~minismtp.connection.Connection`) over a :class:`MemoryWire`, run in the test's
    task: a command returns once the driver waits for the client's next bytes.
    """

    __test__: ClassVar[bool] = False  # not a test class, whatever pytest thinks of its name

    app: App
    raise_server_exceptions: bool = True
    peer: tuple[str, int] = ("127.0.0.1", 54321)
    tls: bool = False
    lmtp: bool = False
    #: The messages the App accepted from this client, in order.
    messages: list[Message] = attrs.field(factory=list, init=False)
    #: The greeting of the current session, once connected.
    greeting: Reply | None = attrs.field(default=None, init=False)
    _connection: Connection | None = attrs.field(default=None, init=False)
    _wire: MemoryWire = attrs.field(factory=MemoryWire, init=False)
    _driver: Coroutine[Any, Any, None] | None = attrs.field(default=None, init=False)
    _raised: list[Exception] = attrs.field(factory=list, init=False)
    _lifespan: AsyncExitStack | None = attrs.field(default=None, init=False)

    async def __aenter__(self) -> TestClient:
        stack = AsyncExitStack()
        await stack.enter_async_context(
            self.app.serving(raise_exceptions=self.raise_server_exceptions)
        )
        self._lifespan = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._lifespan = self._lifespan, None
        try:
            if self.connected:
                # The session ends as a vanishing client's would: the App gets its Disconnect.
                with contextlib.suppress(*(() if exc_type is None else (Exception,))):
                    await self.disconnect()
        finally:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)

    @property
    def session(self) -> Session:
        """The current (or last) session, as the App sees it."""
        if self._connection is None:
            raise SessionClosed("not connected: await client.connect() first")
        return self._connection.session

    @property
    def connected(self) -> bool:
        return self._driver is not None

    # -- the wire -----------------------------------------------------------------------------

    async def connect(self) -> Reply:
        """Open a new session and return the greeting (done implicitly by the first command)."""
        if self.connected:
            raise RuntimeError("already connected")
        self._wire = wire = MemoryWire()
        host = _Host(
            _Answers(self),
            tls=TEST_TLS if self.tls else None,
            config=ServerConfig(lmtp=self.lmtp),
        )
        connection = Connection.new(host, wire, self.peer, ("127.0.0.1", 25), hold_greeting=False)
        self._connection = connection
        self._driver = self._serve(connection)
        replies = parse_replies(await self._drive())
        if not replies:
            raise SessionClosed("the server closed the connection without a greeting")
        self.greeting = replies[0]
        return self.greeting

    async def raw(self, data: bytes) -> list[Reply]:
        """Send ``data`` exactly as given; return every reply the server sent back for it."""
        if not self.connected:
            if self._connection is not None:
                raise SessionClosed("the server has closed this session")
            await self.connect()
        self._wire.feed(data)
        return parse_replies(await self._drive())

    async def disconnect(self) -> list[Reply]:
        """Close the client's side (EOF), as a client that vanishes does."""
        return await self.raw(b"")

    @staticmethod
    async def _serve(connection: Connection) -> None:
        dropped = False
        try:
            await connection.run()
        except GeneratorExit:
            # A client left connected outside ``async with`` is garbage: no task to finish in.
            dropped = True
            raise
        finally:
            if not dropped:
                await connection.finish()

    async def _drive(self) -> bytes:
        """Run the session in this task until it waits for the client or ends; what it sent.

        An exception from the App (``raise_server_exceptions``) is raised here, and the
        replies of this step are dropped with it (the test gets the exception, not a 451).
        """
        driver = self._driver
        assert driver is not None
        try:
            waiting_on = driver.send(None)
        except StopIteration:
            self._driver = None
        else:
            if waiting_on is not _PARK:
                await Suspended(driver, waiting_on, _PARK)
            if inspect.getcoroutinestate(driver) == inspect.CORO_CLOSED:  # the session is over
                self._driver = None
        sent = self._wire.take_sent()
        if self._raised:
            raised, self._raised = self._raised[0], []
            raise raised
        return sent

    # -- commands -----------------------------------------------------------------------------

    async def command(self, line: str) -> Reply:
        """Send one command line (CRLF added); return its reply.

        When the server also closes the session (``421`` after too many errors), that last
        reply is returned.
        """
        replies = await self.raw(line.encode() + b"\r\n")
        if not replies:
            raise SessionClosed(f"no reply to {line!r}: the server closed the connection")
        return replies[-1]

    async def ehlo(self, name: str = "localhost") -> Reply:
        return await self.command(f"EHLO {name}")

    async def lhlo(self, name: str = "localhost") -> Reply:
        """LMTP's greeting (RFC 2033 4.1), for a client made with ``lmtp=True``."""
        return await self.command(f"LHLO {name}")

    async def helo(self, name: str = "localhost") -> Reply:
        return await self.command(f"HELO {name}")

    async def starttls(self) -> Reply:
        return await self.command("STARTTLS")

    async def mail(self, address: str, *params: str) -> Reply:
        """``MAIL FROM:<address> params...``; ``""`` is the null sender ``<>``."""
        return await self.command(" ".join((f"MAIL FROM:{_path(address)}", *params)))

    async def rcpt(self, address: str, *params: str) -> Reply:
        return await self.command(" ".join((f"RCPT TO:{_path(address)}", *params)))

    async def data(self, content: bytes) -> Reply:
        """DATA, then ``content`` dot-stuffed and terminated; the final reply (in LMTP, the
        last recipient's: :meth:`data_replies` gives them all).

        When DATA itself is refused (no recipients, ...), that refusal is returned and the
        content is not sent.
        """
        return (await self.data_replies(content))[-1]

    async def data_replies(self, content: bytes) -> list[Reply]:
        """As :meth:`data`, with every reply after the content: one in SMTP, one per accepted
        RCPT in LMTP, in RCPT order (RFC 2033 4.2)."""
        reply = await self.command("DATA")
        if reply.code != 354:
            return [reply]
        replies = await self.raw(dot_stuff(content))
        if not replies:
            raise SessionClosed("no reply to the message: the server closed the connection")
        return replies

    async def bdat(self, chunk: bytes, last: bool = False) -> Reply:
        """``BDAT <size> [LAST]`` with ``chunk`` in the same write (RFC 3030)."""
        header = f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode()
        replies = await self.raw(header + chunk)
        if not replies:
            raise SessionClosed("no reply to BDAT: the server closed the connection")
        return replies[-1]

    async def rset(self) -> Reply:
        return await self.command("RSET")

    async def noop(self) -> Reply:
        return await self.command("NOOP")

    async def quit(self) -> Reply:
        return await self.command("QUIT")

    async def send_message(
        self, sender: str, recipients: str | Iterable[str], data: bytes
    ) -> list[Reply]:
        """One transaction: MAIL, each RCPT, DATA. Returns those replies, in order (in LMTP,
        the replies after the content are one per accepted recipient).

        Says EHLO (LHLO) first if the session has not. Stops after a refused MAIL, or when no
        recipient was accepted (then RSET, whose reply is not returned), as smtplib does.
        """
        if not self.connected or self.session.helo_name is None:
            reply = await (self.lhlo() if self.lmtp else self.ehlo())
            if reply.code != 250:
                raise SessionClosed(f"{'LHLO' if self.lmtp else 'EHLO'} refused: {reply}")
        replies = [await self.mail(sender)]
        if replies[0].code != 250:
            return replies
        for recipient in [recipients] if isinstance(recipients, str) else recipients:
            replies.append(await self.rcpt(recipient))
        if not any(reply.code in (250, 251) for reply in replies[1:]):
            await self.rset()
            return replies
        replies += await self.data_replies(data)
        return replies
