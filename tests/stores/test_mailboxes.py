"""Mailboxes: a Maildir per recipient, each recipient's failure its own reply (RFC 2033 4.2)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import anyio
import pytest

from minismtp.message import Message
from minismtp.stores.mailboxes import Mailboxes
from minismtp.types import Address, Reply

pytestmark = pytest.mark.anyio

DATA = b"Received: from x\r\nSubject: t\r\n\r\nbody\r\n\x00\xff\r\n"


def addr(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain, f"<{text}>")


def message(*recipients: str) -> Message:
    return Message.from_bytes(DATA, rcpt_to=tuple(addr(r) for r in recipients))


def make_mailbox(root: Path, domain: str, local: str) -> Path:
    path = root / domain / local
    path.mkdir(parents=True)
    return path


def delivered(mailbox: Path) -> list[Path]:
    return sorted((mailbox / "new").iterdir())


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def same_file(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b)


async def test_each_recipient_gets_the_message_in_new(tmp_path: Path) -> None:
    alice = make_mailbox(tmp_path, "example.com", "alice")
    bob = make_mailbox(tmp_path, "example.org", "bob")
    replies = await Mailboxes(tmp_path).put(message("alice@example.com", "bob@example.org"))
    assert replies == {}
    (a,) = delivered(alice)
    (b,) = delivered(bob)
    assert a.read_bytes() == b.read_bytes() == DATA
    assert a.name == b.name
    assert same_file(a, b)  # written once, linked into the second mailbox
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    assert list((alice / "tmp").iterdir()) == list((bob / "tmp").iterdir()) == []
    assert sorted(p.name for p in alice.iterdir()) == ["cur", "new", "tmp"]


async def test_a_spooled_message_is_linked_never_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large message is in a file in the store's spool_dir already: each mailbox gets a
    link to it (after an fsync of it), and nothing is written in tmp/."""
    alice = make_mailbox(tmp_path, "example.com", "alice")
    bob = make_mailbox(tmp_path, "example.com", "bob")
    store = Mailboxes(tmp_path)
    await store.open()
    spooled = store.spool_dir / "minismtp-spool-test"
    spooled.write_bytes(DATA)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    msg = Message.from_file(
        spooled, owned=True, rcpt_to=(addr("alice@example.com"), addr("bob@example.com"))
    )
    assert await store.put(msg) == {}
    (a,) = delivered(alice)
    (b,) = delivered(bob)
    assert same_file(a, spooled) and same_file(b, spooled)
    assert synced[0] == str(spooled)
    assert names(alice / "tmp") == names(bob / "tmp") == []
    msg.close()  # the spool's own name goes; the mailboxes' links stay
    assert not spooled.exists() and a.read_bytes() == DATA


async def test_open_makes_the_spool_folder_and_cleans_it(tmp_path: Path) -> None:
    store = Mailboxes(tmp_path / "root")
    await store.open()
    old = store.spool_dir / "left-over"
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    fresh = store.spool_dir / "in-use"
    fresh.write_bytes(b"y")
    await store.open()
    assert names(store.spool_dir) == ["in-use"]
    assert store.path_for(Address("a", ".spool")) is None  # never a mailbox


async def test_an_unknown_recipient_is_refused_and_the_others_delivered(tmp_path: Path) -> None:
    alice = make_mailbox(tmp_path, "example.com", "alice")
    msg = message("nobody@example.com", "alice@example.com")
    replies = await Mailboxes(tmp_path).put(msg)
    assert replies == {msg.rcpt_to[0]: Reply(550, "5.1.1", "No such mailbox")}
    assert len(delivered(alice)) == 1
    assert not (tmp_path / "example.com" / "nobody").exists()


async def test_every_recipient_unknown(tmp_path: Path) -> None:
    msg = message("a@example.com", "b@example.com")
    replies = await Mailboxes(tmp_path).put(msg)
    assert {r.code for r in replies.values()} == {550}
    assert set(replies) == set(msg.rcpt_to)


async def test_the_default_mapping_lower_cases(tmp_path: Path) -> None:
    alice = make_mailbox(tmp_path, "example.com", "alice")
    assert await Mailboxes(tmp_path).put(message("Alice@Example.COM")) == {}
    assert len(delivered(alice)) == 1


@pytest.mark.parametrize(
    "address",
    [
        Address('"../../etc"', "example.com"),  # a quoted local part: never a path
        Address("..", "example.com"),
        Address(".hidden", "example.com"),
        Address("a", ".."),
        Address("a", "[192.0.2.1]"),
        Address("postmaster", ""),
        Address("a/b", "example.com"),
    ],
)
async def test_the_default_mapping_never_leaves_the_root(tmp_path: Path, address: Address) -> None:
    root = tmp_path / "root"
    root.mkdir()
    store = Mailboxes(root, create=True)  # even where mailboxes are made on demand
    assert store.path_for(address) is None
    replies = await store.put(Message.from_bytes(DATA, rcpt_to=(address,)))
    assert replies[address].code == 550
    assert names(tmp_path) == ["root"]
    assert names(root) == []


async def test_a_mapping_chooses_the_mailbox(tmp_path: Path) -> None:
    lists = make_mailbox(tmp_path, "lists", "dev")

    def mapping(address: Address) -> Path | None:
        return (
            tmp_path / "lists" / address.local_part if address.domain == "lists.example" else None
        )

    store = Mailboxes(tmp_path, mailbox=mapping)
    msg = message("dev@lists.example", "dev@elsewhere.example")
    replies = await store.put(msg)
    assert list(replies) == [msg.rcpt_to[1]]
    assert len(delivered(lists)) == 1


async def test_two_recipients_of_one_mailbox_get_one_copy(tmp_path: Path) -> None:
    box = make_mailbox(tmp_path, "shared", "box")
    store = Mailboxes(tmp_path, mailbox=lambda a: tmp_path / "shared" / "box")
    assert await store.put(message("a@x.example", "b@x.example")) == {}
    assert len(delivered(box)) == 1


async def test_create_makes_missing_mailboxes(tmp_path: Path) -> None:
    assert await Mailboxes(tmp_path, create=True).put(message("new@example.com")) == {}
    assert len(delivered(tmp_path / "example.com" / "new")) == 1


async def test_exists_tells_an_rcpt_hook(tmp_path: Path) -> None:
    make_mailbox(tmp_path, "example.com", "alice")
    store = Mailboxes(tmp_path)
    assert store.exists(addr("alice@example.com"))
    assert not store.exists(addr("bob@example.com"))
    assert not store.exists(Address('"x"', "example.com"))


def _failing_link(target_part: str, code: int) -> object:
    real_link = os.link

    def link(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if target_part in str(dst):
            raise OSError(code, os.strerror(code))
        real_link(src, dst)

    return link


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (errno.ENOSPC, Reply(452, "4.2.2", "Mailbox full")),
        (errno.EDQUOT, Reply(452, "4.2.2", "Mailbox full")),
        (errno.EACCES, Reply(451, "4.3.0", "Requested action aborted: local error in processing")),
        (errno.EIO, Reply(451, "4.3.0", "Requested action aborted: local error in processing")),
    ],
)
async def test_an_os_error_is_that_recipients_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reply: Reply
) -> None:
    alice = make_mailbox(tmp_path, "example.com", "alice")
    bob = make_mailbox(tmp_path, "example.com", "bob")
    carol = make_mailbox(tmp_path, "example.com", "carol")
    monkeypatch.setattr(os, "link", _failing_link("/bob/", code))
    msg = message("alice@example.com", "bob@example.com", "carol@example.com")
    replies = await Mailboxes(tmp_path).put(msg)
    assert replies == {msg.rcpt_to[1]: reply}
    assert len(delivered(alice)) == len(delivered(carol)) == 1
    assert delivered(bob) == []
    assert list((alice / "tmp").iterdir()) == list((bob / "tmp").iterdir()) == []


async def test_a_failed_first_write_leaves_the_next_mailbox_to_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first mailbox's disk is full: the copy is written into the second one instead."""
    alice = make_mailbox(tmp_path, "example.com", "alice")
    bob = make_mailbox(tmp_path, "example.com", "bob")
    real_open = os.open

    def full_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if "/alice/tmp/" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", full_open)
    msg = message("alice@example.com", "bob@example.com")
    replies = await Mailboxes(tmp_path).put(msg)
    assert replies == {msg.rcpt_to[0]: Reply(452, "4.2.2", "Mailbox full")}
    assert [p.read_bytes() for p in delivered(bob)] == [DATA]
    assert delivered(alice) == []


async def test_across_file_systems_a_mailbox_gets_its_own_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = make_mailbox(tmp_path, "example.com", "alice")
    bob = make_mailbox(tmp_path, "example.com", "bob")
    monkeypatch.setattr(os, "link", _failing_link("/bob/", errno.EXDEV))
    assert await Mailboxes(tmp_path).put(message("alice@example.com", "bob@example.com")) == {}
    (a,) = delivered(alice)
    (b,) = delivered(bob)
    assert b.read_bytes() == DATA and not same_file(a, b)
    assert list((bob / "tmp").iterdir()) == []


async def test_file_and_every_new_folder_are_fsynced_before_put_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_mailbox(tmp_path, "example.com", "alice")
    make_mailbox(tmp_path, "example.com", "bob")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await Mailboxes(tmp_path).put(message("alice@example.com", "bob@example.com"))
    base = str(tmp_path / "example.com")
    assert synced[0].startswith(f"{base}/alice/tmp/")  # the one copy written
    assert sorted(synced[1:]) == [f"{base}/alice/new", f"{base}/bob/new"]


async def test_a_failed_folder_fsync_fails_that_recipient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_mailbox(tmp_path, "example.com", "alice")
    make_mailbox(tmp_path, "example.com", "bob")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/bob/new"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    msg = message("alice@example.com", "bob@example.com")
    store = Mailboxes(tmp_path)
    replies = await store.put(msg)
    assert [(a.local_part, r.code) for a, r in replies.items()] == [("bob", 451)]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert await store.put(msg) == {}  # the next delivery syncs anew


async def test_concurrent_puts_into_one_mailbox_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = make_mailbox(tmp_path, "example.com", "alice")
    directory_syncs = 0
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        nonlocal directory_syncs
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/new"):
            directory_syncs += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = Mailboxes(tmp_path)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                tasks.start_soon(store.put, message("alice@example.com"))
    assert len(delivered(alice)) == 20
    assert 1 <= directory_syncs <= 20
    assert store._syncs == {}  # idle folders are let go


async def test_open_creates_the_root_and_reports_a_bad_one(tmp_path: Path) -> None:
    await Mailboxes(tmp_path / "a" / "b").open()
    assert names(tmp_path / "a" / "b") == [".spool"]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError, match="mailbox root"):
        await Mailboxes(tmp_path / "file" / "root").open()
