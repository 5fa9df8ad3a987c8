"""Drive an App through whole SMTP dialogues in memory, without a socket.

::

    from minismtp.testing import TestClient

    async def test_foreign_domain_is_refused():
        async with TestClient(app) as client:
            await client.ehlo("test.example.org")
            await client.mail("a@example.org")
            reply = await client.rcpt("b@elsewhere.org")
            assert reply.code == 550

The client feeds the same sans-I/O engine the server uses and answers its events with the
App, so a test sees exactly the bytes a real client would, parsed into :class:`Reply` objects.
Like Starlette's ``TestClient``, an exception raised by a hook or middleware is raised in the
test (``raise_server_exceptions=False`` shows the ``451`` a client would get instead), and
``async with`` runs the App's serving period: startup and shutdown hooks, ``on_message``
consumers, which have drained every accepted message when the block ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import ClassVar

import attrs

from minismtp.app import LOCAL_ERROR, App
from minismtp.events import Event
from minismtp.ids import new_id
from minismtp.message import Message
from minismtp.protocol import NEED_DATA, Closed, Engine, StartTLS
from minismtp.types import Reply, Session, TLSInfo

__all__ = ["SessionClosed", "TestClient", "parse_replies"]

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


@attrs.define(eq=False)
class TestClient:
    """An in-memory SMTP client for ``app``; see the module docstring.

    ``peer`` is the client address the App sees. ``tls`` offers STARTTLS, which then
    "succeeds" at once, recording :data:`TEST_TLS` on the session. Every message the App
    accepts in this client's sessions is appended to :attr:`messages`.
    """

    __test__: ClassVar[bool] = False  # not a test class, whatever pytest thinks of its name

    app: App
    raise_server_exceptions: bool = True
    peer: tuple[str, int] = ("127.0.0.1", 54321)
    tls: bool = False
    #: The messages the App accepted from this client, in order.
    messages: list[Message] = attrs.field(factory=list, init=False)
    #: The greeting of the current session, once connected.
    greeting: Reply | None = attrs.field(default=None, init=False)
    _engine: Engine | None = attrs.field(default=None, init=False)
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
        self._forget_session()
        stack, self._lifespan = self._lifespan, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    @property
    def session(self) -> Session:
        """The current (or last) session, as the App sees it."""
        if self._engine is None:
            raise SessionClosed("not connected: await client.connect() first")
        return self._engine.session

    @property
    def connected(self) -> bool:
        return self._engine is not None and not self._engine.closed

    # -- the wire -----------------------------------------------------------------------------

    async def connect(self) -> Reply:
        """Open a new session and return the greeting (done implicitly by the first command)."""
        if self.connected:
            raise RuntimeError("already connected")
        session = Session(
            id=new_id(), hostname=self.app.hostname, peer=self.peer, local=("127.0.0.1", 25)
        )
        self._engine = Engine(session, self.app.limits, tls_available=self.tls)
        self.app._watchers[session] = self.messages.append
        replies = parse_replies(await self._run())
        if not replies:
            raise SessionClosed("the server closed the connection without a greeting")
        self.greeting = replies[0]
        return self.greeting

    async def raw(self, data: bytes) -> list[Reply]:
        """Send ``data`` exactly as given; return every reply the server sent back for it."""
        if not self.connected:
            if self._engine is not None:
                raise SessionClosed("the server has closed this session")
            await self.connect()
        assert self._engine is not None
        self._engine.receive_data(data)
        return parse_replies(await self._run())

    async def disconnect(self) -> list[Reply]:
        """Close the client's side (EOF), as a client that vanishes does."""
        return await self.raw(b"")

    async def _run(self) -> bytes:
        """Let the engine go until it needs more data or closes; answer its events meanwhile."""
        engine = self._engine
        assert engine is not None
        while True:
            event = engine.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Closed):
                self._forget_session()
                break
            if isinstance(event, StartTLS):
                engine.tls_started(TEST_TLS)
            elif isinstance(event, Event):
                engine.respond(await self._answer(event))
        return engine.data_to_send()

    async def _answer(self, event: Event) -> Reply:
        try:
            return await self.app.handle(event, raise_exceptions=self.raise_server_exceptions)
        except Exception:
            # Answer as the server would, so that the test may go on with this session; the
            # 451 itself is not shown: the test gets the exception instead.
            assert self._engine is not None
            self._engine.respond(LOCAL_ERROR)
            self._engine.data_to_send()
            raise

    def _forget_session(self) -> None:
        if self._engine is not None:
            self._engine.close()  # a transaction left open lets go of its spooled content
            self.app._watchers.pop(self._engine.session, None)

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
        """DATA, then ``content`` dot-stuffed and terminated; the final reply.

        When DATA itself is refused (no recipients, ...), that refusal is returned and the
        content is not sent.
        """
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        replies = await self.raw(dot_stuff(content))
        if not replies:
            raise SessionClosed("no reply to the message: the server closed the connection")
        return replies[-1]

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
        """One transaction: MAIL, each RCPT, DATA. Returns those replies, in order.

        Says EHLO first if the session has not. Stops after a refused MAIL, or when no
        recipient was accepted (then RSET, whose reply is not returned), as smtplib does.
        """
        if not self.connected or self.session.helo_name is None:
            reply = await self.ehlo()
            if reply.code != 250:
                raise SessionClosed(f"EHLO refused: {reply}")
        replies = [await self.mail(sender)]
        if replies[0].code != 250:
            return replies
        for recipient in [recipients] if isinstance(recipients, str) else recipients:
            replies.append(await self.rcpt(recipient))
        if not any(reply.code in (250, 251) for reply in replies[1:]):
            await self.rset()
            return replies
        replies.append(await self.data(data))
        return replies
