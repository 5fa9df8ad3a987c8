"""The message body API over both kinds of spool: memory up to the threshold, then a file."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import anyio
import pytest

from minismtp import spool
from minismtp.app import App
from minismtp.message import Message
from minismtp.protocol import Limits
from minismtp.testing import TestClient
from minismtp.types import Reply, Transaction

pytestmark = pytest.mark.anyio

THRESHOLD = 4096
HEADERS = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: Hello\r\n X folded\r\n"


def body(size: int) -> bytes:
    """A message of ``size`` octets of content: headers, an empty line, 80-octet lines."""
    head = HEADERS + b"\r\n"
    line = b"0123456789" * 7 + b"abcdefgh\r\n"
    text = head + line * (size // len(line) + 1)
    return text[: size - 2] + b"\r\n" if size > len(head) + 2 else head[:size]


@pytest.fixture(params=["memory", "file"])
def size(request: pytest.FixtureRequest) -> int:
    return 1000 if request.param == "memory" else 10 * THRESHOLD


def spool_app(tmp_path: Path, **options: object) -> App:
    return App(hostname="mx.test", spool_dir=tmp_path, spool_memory=THRESHOLD, **options)  # type: ignore[arg-type]


def spool_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(spool.PREFIX))


async def test_open_chunks_headers_data_and_original_agree(tmp_path: Path, size: int) -> None:
    app = spool_app(tmp_path)
    content = body(size)
    async with TestClient(app) as client:
        replies = await client.send_message("a@example.org", "b@example.com", content)
        assert replies[-1].code == 250
    [message] = client.messages
    with message:
        assert message.size == len(content)
        assert message.original == content
        whole = message.data
        assert whole == whole[: message.trace_length] + content
        assert whole.startswith(b"Received: from ")
        with message.open() as first, message.open() as second:
            assert first.read() == whole
            second.seek(message.trace_length)
            assert second.read(5) == content[:5]
        pieces = [bytes(chunk) async for chunk in message.chunks(1000)]
        assert b"".join(pieces) == whole and max(map(len, pieces)) <= 1000
        assert message.headers["Subject"] == "Hello X folded"
        assert message.headers["To"] == "b@example.com"
        assert message.headers["Received"].startswith("from ")
        if size > THRESHOLD:
            assert message.path is not None and message.path.parent == tmp_path
            assert message.path.read_bytes() == whole
        else:
            assert message.path is None
            assert spool_files(tmp_path) == []
    assert spool_files(tmp_path) == []  # closed: the file is gone
    with pytest.raises(ValueError, match="closed"):
        message.open()


async def test_a_message_nobody_closes_is_cleaned_up_when_collected(tmp_path: Path) -> None:
    app = spool_app(tmp_path)
    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", body(10 * THRESHOLD))
    assert len(spool_files(tmp_path)) == 1
    while app.messages.statistics().current_buffer_used:
        app.messages.receive_nowait()
    del client  # its record of the message, and of the transaction it came in
    gc.collect()
    assert spool_files(tmp_path) == []


async def test_prepend_and_drop_headers_before_the_hand_over(tmp_path: Path, size: int) -> None:
    """An authentication check adds its result on top and drops forged ones (RFC 8601 5)."""
    app = spool_app(tmp_path)
    forged = b"Authentication-Results: mx.test; spf=pass\r\n"
    content = forged + body(size)
    dropped: list[int] = []

    @app.on_data
    def authenticate(tx: Transaction, message: Message) -> None:
        dropped.append(
            message.drop_headers(lambda name, value: name.lower() == "authentication-results")
        )
        message.prepend_header("Authentication-Results", "mx.test;\r\n spf=fail")

    async with TestClient(app) as client:
        assert (await client.send_message("a@example.org", "b@example.com", content))[
            -1
        ].code == 250
    [message] = client.messages
    with message:
        assert dropped == [1]
        data = message.data
        assert data.startswith(b"Authentication-Results: mx.test;\r\n spf=fail\r\nReceived: from ")
        assert data.count(b"Authentication-Results") == 1
        assert data.endswith(body(size)) and message.original == body(size)
        assert message.size == len(content)  # as the client sent it
        assert message.headers["Authentication-Results"] == "mx.test; spf=fail"
        with message.open() as file:
            assert file.read() == data


async def test_header_edits_on_a_large_message_keep_its_spool_file(tmp_path: Path) -> None:
    """One copy on disk, into the same file name: the body never comes into memory."""
    app = spool_app(tmp_path)
    content = body(50 * THRESHOLD)
    paths: list[Path | None] = []

    @app.on_data
    def edit(tx: Transaction, message: Message) -> None:
        paths.append(message.path)
        message.prepend_header("X-Scanned", "yes")
        paths.append(message.path)

    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", content)
    [message] = client.messages
    with message:
        assert paths[0] == paths[1] and paths[0] is not None
        assert spool_files(tmp_path) == [paths[0].name]
        assert paths[0].read_bytes().startswith(b"X-Scanned: yes\r\nReceived: ")
        assert message.original == content


def test_bad_header_names_and_folding_are_refused() -> None:
    message = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n")
    with pytest.raises(ValueError):
        message.prepend_header("Bad Name", "x")
    for value in ("one\r\ntwo", "one\ntwo", "one\rtwo", "one\r\n"):
        with pytest.raises(ValueError):
            message.prepend_header("X-Ok", value)
    message.prepend_header("X-Ok", "one\r\n two")
    assert message.data == b"X-Ok: one\r\n two\r\nSubject: x\r\n\r\nbody\r\n"


def test_messages_built_from_bytes_and_from_files(tmp_path: Path) -> None:
    """What ``minismtp consume`` builds from a stored message."""
    stored = (
        b"Received: from x\r\n\tby y; Mon, 1 Jan 2026 00:00:00 +0000\r\nSubject: s\r\n\r\nhi\r\n"
    )
    trace = stored.index(b"Subject")
    from_bytes = Message.from_bytes(stored, trace_length=trace, id="ABC")
    assert (from_bytes.id, from_bytes.size, from_bytes.original) == (
        "ABC",
        len(stored) - trace,
        b"Subject: s\r\n\r\nhi\r\n",
    )
    assert from_bytes.path is None and from_bytes.headers["Subject"] == "s"
    path = tmp_path / "message"
    path.write_bytes(stored)
    kept = Message.from_file(path, trace_length=trace)
    assert kept.path == path and kept.data == stored and kept.headers["Subject"] == "s"
    kept.close()
    assert path.exists()  # not owned: the caller's file
    owned = Message.from_file(path, owned=True)
    with owned:
        assert owned.original == stored
    assert not path.exists()


def test_a_header_section_without_an_end_or_with_none_at_all() -> None:
    headers_only = Message.from_bytes(b"Subject: only headers\r\n")
    assert headers_only.headers["Subject"] == "only headers"
    assert headers_only.drop_headers(lambda name, value: True) == 1
    assert headers_only.data == b""
    no_headers = Message.from_bytes(b"\r\nJust a body\r\n")
    assert no_headers.headers.keys() == []
    assert no_headers.drop_headers(lambda name, value: True) == 0


async def test_a_streaming_hook_sees_every_chunk_and_may_refuse(tmp_path: Path) -> None:
    """aiosmtpd PR #543's handle_DATA_CHUNK: act while content arrives; a refusal is answered
    at the end of the data, the spool is dropped, and the session goes on."""
    app = spool_app(tmp_path)
    seen: list[int] = []

    @app.on_data_chunk
    def scan(tx: Transaction, chunk: bytes | memoryview) -> Reply | None:
        seen.append(len(chunk))
        if b"EICAR" in bytes(chunk):
            return Reply(554, "5.7.0", "Virus found")
        return None

    clean = body(20 * THRESHOLD)
    infected = clean + b"EICAR\r\n" + clean
    async with TestClient(app) as client:
        assert (await client.send_message("a@example.org", "b@example.com", clean))[-1].code == 250
        assert sum(seen) == len(clean)
        replies = await client.send_message("a@example.org", "b@example.com", infected)
        assert replies[-1] == Reply(554, "5.7.0", "Virus found")
        assert len(spool_files(tmp_path)) == 1  # the first message's, on the channel
        assert (await client.noop()).code == 250
        assert (await client.send_message("a@example.org", "b@example.com", clean))[-1].code == 250
    assert [m.original for m in client.messages] == [clean, clean]
    for message in client.messages:
        message.close()
    assert spool_files(tmp_path) == []


@pytest.mark.parametrize("at", ["creating the file", "appending"])
async def test_a_full_disk_while_spooling_is_452_4_3_1_and_nothing_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    """ENOSPC by fault injection at the spool's write; the session and the server go on."""
    app = spool_app(tmp_path)
    real_write = spool._write_all
    writes = 0

    def full_disk(fd: int, pieces: list[bytes | memoryview]) -> None:
        nonlocal writes
        writes += 1
        if at == "creating the file" or writes > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, pieces)

    content = body(400 * THRESHOLD)
    async with TestClient(app) as client:
        monkeypatch.setattr(spool, "_write_all", full_disk)
        replies = await client.send_message("a@example.org", "b@example.com", content)
        assert replies[-1] == Reply(452, "4.3.1", "Insufficient system storage")
        assert spool_files(tmp_path) == []
        monkeypatch.setattr(spool, "_write_all", real_write)
        assert (await client.send_message("a@example.org", "b@example.com", content))[
            -1
        ].code == 250
    assert [m.original for m in client.messages] == [content]
    client.messages[0].close()


async def test_the_threshold_is_an_app_and_limits_option(tmp_path: Path) -> None:
    assert App().limits.spool_memory == 256 * 1024
    assert App(spool_memory=10).limits.spool_memory == 10
    assert App(limits=Limits(spool_memory=20)).limits.spool_memory == 20
    app = App(spool_dir=tmp_path, spool_memory=10)
    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", b"x" * 9 + b"\r\n")
    with client.messages[0] as message:
        assert message.path is not None  # the trace header alone is over 10 octets


async def test_left_over_spool_files_are_removed_at_start_up(tmp_path: Path) -> None:
    """Files of a process that died (no lock held) go; a spool in use, and others' files,
    stay."""
    dead = tmp_path / f"{spool.PREFIX}999-dead"
    dead.write_bytes(b"left over")
    os.utime(dead, (0, 0))
    other = tmp_path / "not-ours"
    other.write_bytes(b"x")
    os.utime(other, (0, 0))
    in_use = spool.Spool(tmp_path, memory_limit=0)
    in_use.write(b"being received")
    assert in_use.path is not None
    os.utime(in_use.path, (0, 0))
    async with TestClient(spool_app(tmp_path)):
        pass
    assert sorted(os.listdir(tmp_path)) == sorted(["not-ours", in_use.path.name])
    in_use.close()
    assert os.listdir(tmp_path) == ["not-ours"]


async def test_a_message_handed_over_is_not_closed_by_the_end_of_its_session(
    tmp_path: Path,
) -> None:
    app = spool_app(tmp_path)
    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", body(10 * THRESHOLD))
        await client.quit()
        with anyio.fail_after(5):
            message = await app.messages.receive()
    with message:
        assert message.original == body(10 * THRESHOLD)


async def test_a_missing_spool_directory_is_created_at_start_up(tmp_path: Path) -> None:
    app = spool_app(tmp_path / "a" / "spool")
    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", body(10 * THRESHOLD))
    assert len(spool_files(tmp_path / "a" / "spool")) == 1
    client.messages[0].close()


async def test_a_streaming_hook_that_raises_is_451_at_the_end_of_data(tmp_path: Path) -> None:
    app = spool_app(tmp_path)
    calls = 0

    @app.on_data_chunk
    def broken(tx: Transaction, chunk: bytes | memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the scanner crashed")

    async with TestClient(app, raise_server_exceptions=False) as client:
        replies = await client.send_message("a@example.org", "b@example.com", body(1000))
        assert replies[-1] == Reply(
            451, "4.3.0", "Requested action aborted: local error in processing"
        )
        assert (await client.send_message("a@example.org", "b@example.com", body(1000)))[
            -1
        ].code == 250
    assert [m.original for m in client.messages] == [body(1000)]
