"""Over a real socket: content streams into the spool and out byte-exact (DATA and BDAT, into
the channel and into a Maildir), and every way a transaction ends without a hand-over leaves
no spool file behind (RFC 5321 4.1.1.4, 4.1.1.5, 4.5.3.2; RFC 3030)."""

from __future__ import annotations

import hashlib
import os
import smtplib
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import anyio
import anyio.to_thread
import pytest

from minismtp import spool
from minismtp.app import App
from minismtp.events import DataChunk, Event, Handler
from minismtp.message import Message
from minismtp.server import Server, ServerConfig, serve
from minismtp.stores.maildir import Maildir
from minismtp.types import Reply, Transaction
from tests.helpers.clients import WireClient, drain

pytestmark = pytest.mark.anyio


THRESHOLD = 1024
CLIENTS = 50


def content(size: int) -> bytes:
    """``size`` octets: a header, then 64-octet lines, some starting with a dot."""
    line = b".dotted line, stuffed on the wire" + b"x" * 29 + b"\r\n"
    text = b"Subject: t\r\n\r\n" + line * (size // len(line) + 1)
    if size < 2:
        return b"x" * size
    return text[: size - 2] + b"\r\n"


def blocks(text: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def stored_files(app: App, tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "box" / "new").iterdir()) if app.maildir else []


def leftovers(app: App, tmp_path: Path) -> list[str]:
    """Spool files in the spool directory, and anything in the Maildir's tmp/."""
    if app.maildir is not None:
        return sorted(os.listdir(app.maildir.tmp))
    return sorted(n for n in os.listdir(tmp_path / "spool") if n.startswith(spool.PREFIX))


def make_app(tmp_path: Path, store: str, **options: Any) -> App:
    (tmp_path / "spool").mkdir(exist_ok=True)
    maildir = Maildir(tmp_path / "box") if store == "maildir" else None
    return App(
        hostname="mx.test",
        maildir=maildir,
        spool_dir=tmp_path / "spool",
        spool_memory=THRESHOLD,
        **options,
    )


@asynccontextmanager
async def connected(port: int) -> AsyncIterator[WireClient]:
    client = WireClient(await anyio.connect_tcp("127.0.0.1", port))
    try:
        assert (await client.reply()).startswith("220")
        assert (await client.command("EHLO c.test")).startswith("250")
        assert (await client.command("MAIL FROM:<a@example.org>")).startswith("250")
        assert (await client.command("RCPT TO:<b@example.com>")).startswith("250")
        yield client
    finally:
        await anyio.aclose_forcefully(client.stream)


async def send_data(client: WireClient, text: bytes) -> str:
    assert (await client.command("DATA")).startswith("354")
    stuffed = b"." + text if text.startswith(b".") else text
    for block in blocks(stuffed.replace(b"\r\n.", b"\r\n..")):
        await client.send(block)
    await client.send(b".\r\n")
    return await client.reply()


async def send_bdat(client: WireClient, text: bytes) -> str:
    half = len(text) // 2
    await client.send(b"BDAT %d\r\n" % half)
    for block in blocks(text[:half]):
        await client.send(block)
    assert (await client.reply()).startswith("250")
    await client.send(b"BDAT %d LAST\r\n" % (len(text) - half))
    for block in blocks(text[half:]):
        await client.send(block)
    return await client.reply()


async def delivered(app: App, server: Server, tmp_path: Path) -> bytes:
    """The one message delivered, whole, as stored or as taken off the channel."""
    if app.maildir is not None:
        [path] = stored_files(app, tmp_path)
        return path.read_bytes()
    message = server.mail_rx.receive_nowait()
    with message:
        return message.data


SIZES = [0, 1, 2, THRESHOLD - 200, THRESHOLD + 1, 300 * 1024]


@pytest.mark.parametrize("store", ["channel", "maildir"])
@pytest.mark.parametrize(
    ("command", "size"),
    # DATA content ends with a line end: no 1-octet message there.
    [
        (command, size)
        for command in ("DATA", "BDAT")
        for size in SIZES
        if command == "BDAT" or size != 1
    ],
)
async def test_byte_exact_below_and_above_the_threshold(
    tmp_path: Path, store: str, command: str, size: int
) -> None:
    text = content(size)
    app = make_app(tmp_path, store)
    async with serve(app, "127.0.0.1", 0) as server:
        async with connected(server.port) as client:
            send = send_data if command == "DATA" else send_bdat
            reply = await send(client, text)
            assert reply.startswith("250 2.0.0 OK queued as ")
            assert (await client.command("QUIT")).startswith("221")
        data = await delivered(app, server, tmp_path)
    assert data.startswith(b"Received: from c.test ([127.0.0.1])")
    assert data[data.index(b"\r\n", data.index(b"; ")) + 2 :] == text
    assert leftovers(app, tmp_path) == []


async def stream_hashed(port: int, size: int, bdat: bool) -> tuple[str, str]:
    """Send ``size`` octets of generated lines; the final reply and the content's SHA-256."""
    line = b"%-62d\r\n"
    digest = hashlib.sha256()
    async with connected(port) as client:
        if bdat:
            await client.send(b"BDAT %d LAST\r\n" % size)
        else:
            assert (await client.command("DATA")).startswith("354")
        sent = 0
        number = 0
        while sent < size:
            block = b"".join(line % (number + i) for i in range(4096))[: size - sent]
            number += 4096
            digest.update(block)
            await client.send(block)
            sent += len(block)
        if not bdat:
            await client.send(b".\r\n")
        with anyio.fail_after(60):
            reply = await client.reply()
    return reply, digest.hexdigest()


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
@pytest.mark.parametrize("store", ["channel", "maildir"])
async def test_a_100_mb_body_arrives_byte_exact(tmp_path: Path, store: str, command: str) -> None:
    size = 100 * 1024 * 1024
    app = make_app(tmp_path, store, max_size=2 * size)
    async with serve(app, "127.0.0.1", 0) as server:
        reply, sent = await stream_hashed(server.port, size, command == "BDAT")
        assert reply.startswith("250 2.0.0")
        if store == "maildir":
            [path] = stored_files(app, tmp_path)
            message = None
        else:
            message = server.mail_rx.receive_nowait()
            path = message.path
            assert path is not None and path.parent == tmp_path / "spool"
        digest = hashlib.sha256()
        with path.open("rb") as file:
            trace = file.readline() + file.readline() + file.readline()
            assert trace.startswith(b"Received: ")
            while block := file.read(1 << 20):
                digest.update(block)
        assert digest.hexdigest() == sent
        if message is not None:
            assert message.size == size
            message.close()
    assert leftovers(app, tmp_path) == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiosmtplib runs on asyncio only
async def test_real_clients_smtplib_and_aiosmtplib(tmp_path: Path) -> None:
    app = make_app(tmp_path, "maildir")
    small, large = content(500), content(50 * THRESHOLD)
    async with serve(app, "127.0.0.1", 0) as server:

        def with_smtplib() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
                smtp.sendmail("a@example.org", ["b@example.com"], small)
                smtp.sendmail("a@example.org", ["b@example.com"], large)

        await anyio.to_thread.run_sync(with_smtplib)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port) as smtp:
            await smtp.sendmail("a@example.org", ["b@example.com"], large)
    stored = sorted(path.read_bytes() for path in stored_files(app, tmp_path))
    assert sorted(data[data.index(b"Subject: ") :] for data in stored) == sorted(
        [small, large, large]
    )
    assert leftovers(app, tmp_path) == []


# -- nothing left behind --------------------------------------------------------------------------


class SpoolWatch:
    """Counts the transactions whose content went to a spool file, and says when all did;
    with ``refuse``, refuses the content once it is in a file (a scanner in middleware)."""

    acts_on = (DataChunk,)

    def __init__(
        self, app: Handler, *, expected: int, spooled: anyio.Event, refuse: bool = False
    ) -> None:
        self.app = app
        self.expected = expected
        self.spooled = spooled
        self.refuse = refuse
        self.seen: set[Transaction] = set()  # kept: an id() may be used again

    async def __call__(self, event: Event) -> Reply:
        reply = await self.app(event)
        assert isinstance(event, DataChunk)
        message = event.transaction.message
        if message is not None and not message.closed and message.path is not None:
            self.seen.add(event.transaction)
            if len(self.seen) >= self.expected:
                self.spooled.set()
            if self.refuse:
                return Reply(554, "5.7.0", "Refused while streaming")
        return reply


BIG = content(8 * THRESHOLD)
KINDS = [
    "RSET after a BDAT chunk",
    "QUIT after a BDAT chunk",
    "disconnect in DATA",
    "disconnect in BDAT",
    "timeout in DATA",
    "shutdown in DATA",
    "refused: too big",
    "refused: bare LF",
    "refused by a chunk hook",
    "refused by a data hook",
    "exception in a hook",
]


async def abort(kind: str, port: int, spooled: anyio.Event) -> None:
    """One client's transaction, ended ``kind``'s way."""
    async with connected(port) as client:
        if kind.endswith("after a BDAT chunk") or kind == "disconnect in BDAT":
            announced = 2 * len(BIG) if kind == "disconnect in BDAT" else len(BIG)
            await client.send(b"BDAT %d\r\n" % announced)
            await client.send(BIG)
            if kind == "disconnect in BDAT":
                await spooled.wait()
                return
            assert (await client.reply()).startswith("250")
            command = "RSET" if kind.startswith("RSET") else "QUIT"
            assert (await client.command(command)).startswith(("250", "221"))
            return
        assert (await client.command("DATA")).startswith("354")
        if kind in ("disconnect in DATA", "timeout in DATA", "shutdown in DATA"):
            await client.send(BIG)
            if kind == "disconnect in DATA":
                await spooled.wait()
                return
            assert (await client.reply()).startswith("421 4")
            return
        # The content is in a spool file before the end of data comes.
        await client.send(BIG)
        await spooled.wait()
        rest = {"refused: too big": BIG, "refused: bare LF": b"bare\nLF\r\n"}.get(kind, b"")
        await client.send(rest + b".\r\n")
        reply = await client.reply()
        expected = {
            "refused: too big": "552 5.3.4",
            "refused: bare LF": "550 5.5.2",
            "refused by a chunk hook": "554 5.7.0",
            "refused by a data hook": "554 5.7.1",
            "exception in a hook": "451 4.3.0",
            "the store fails": "451 4.3.0",
        }[kind]
        assert reply.startswith(expected), reply
        assert (await client.command("NOOP")).startswith("250")


@pytest.mark.parametrize(
    ("kind", "store"),
    [(kind, store) for kind in KINDS for store in ("channel", "maildir")]
    + [("the store fails", "maildir")],
)
async def test_no_spool_file_is_left_after_50_aborted_transactions(
    tmp_path: Path, store: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(tmp_path, store, max_size=12 * THRESHOLD if kind == "refused: too big" else None)
    spooled = anyio.Event()
    watch: list[SpoolWatch] = []

    def watching(handler: Handler, **options: Any) -> SpoolWatch:
        watch.append(SpoolWatch(handler, **options))
        return watch[0]

    watching.acts_on = (DataChunk,)  # type: ignore[attr-defined]
    refuse = kind == "refused by a chunk hook"
    app.add_middleware(watching, expected=CLIENTS, spooled=spooled, refuse=refuse)

    @app.on_data
    def data_hook(tx: Transaction, message: Message) -> Reply | None:
        if kind == "exception in a hook":
            raise RuntimeError("the scanner crashed")
        if kind == "refused by a data hook":
            return Reply(554, "5.7.1", "Refused")
        return None

    if kind == "the store fails":

        def broken(self: Maildir, name: str, message: Message) -> Path:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Maildir, "_store", broken)
    timeout = 0.5 if kind == "timeout in DATA" else 30.0
    config = ServerConfig(idle_timeout=timeout, shutdown_grace=0.1, shutdown_cancel_after=2.0)
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(abort, kind, server.port, spooled)
                if kind == "shutdown in DATA":
                    await spooled.wait()
                    await server.stop()
    assert len(watch[0].seen) == CLIENTS  # each had a spool file at some point
    assert server.mail_rx.statistics().current_buffer_used == 0
    assert leftovers(app, tmp_path) == []
    assert stored_files(app, tmp_path) == []


# -- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (CI runs as root); skipped where it cannot be mounted."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("store", ["channel", "maildir"])
async def test_a_full_filesystem_is_452_4_3_1_and_the_server_goes_on(
    small_filesystem: Path, store: str
) -> None:
    """ENOSPC on a real filesystem while spooling: 452 4.3.1, nothing kept, and the session
    and the server go on (a message that fits is stored after it)."""
    if store == "maildir":
        app = App(hostname="mx.test", maildir=small_filesystem / "box", spool_memory=THRESHOLD)
    else:
        app = App(hostname="mx.test", spool_dir=small_filesystem, spool_memory=THRESHOLD)
    large, small = content(3 * 1024 * 1024), content(50 * THRESHOLD)
    async with serve(app, "127.0.0.1", 0) as server:
        for _ in range(2):
            async with connected(server.port) as client:
                assert (await send_data(client, large)).startswith("452 4.3.1 ")
                assert (await client.command("MAIL FROM:<a@example.org>")).startswith("250")
                assert (await client.command("RCPT TO:<b@example.com>")).startswith("250")
                # RFC 3030 3: the chunk that failed is answered, and fails the transaction.
                await client.send(b"BDAT %d\r\n" % len(large))
                for block in blocks(large):
                    await client.send(block)
                assert (await client.reply()).startswith("452 4.3.1 ")
                await client.send(b"BDAT 1 LAST\r\nx")
                assert (await client.reply()).startswith("503 5.5.1")
                assert (await client.command("MAIL FROM:<a@example.org>")).startswith("250")
                assert (await client.command("RCPT TO:<b@example.com>")).startswith("250")
                assert (await send_data(client, small)).startswith("250 2.0.0")
        if store == "channel":
            for message in drain(server):
                assert message.original == small
                message.close()
    spooled = small_filesystem / "box" / "tmp" if store == "maildir" else small_filesystem
    assert [p for p in os.listdir(spooled) if p != "box"] == []
    if store == "maildir":
        stored = sorted((small_filesystem / "box" / "new").iterdir())
        assert [path.read_bytes().endswith(small) for path in stored] == [True, True]
