"""Nothing acknowledged is lost: ``minismtp run --maildir`` killed under load (SIGKILL), and
stopped under load (SIGTERM). A ``250`` after DATA (RFC 5321 4.1.1.4, 6.1: the server takes
responsibility for the message) promises a message complete and byte-exact in ``new/``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import threading
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from tests.helpers.processes import need, run

CLIENTS = 20
ACKED_BEFORE_THE_SIGNAL = 200


def body(client: int, n: int) -> bytes:
    # Sizes vary from a few hundred bytes to ~40 KB, so some writes are caught half done.
    line = b"%d-%d " % (client, n) * 8 + b"\r\n"
    filler = line * (1 + (n * 7919 + client * 104729) % 500)
    return b"X-Seq: %d-%d\r\nSubject: durability\r\n\r\n" % (client, n) + filler + b"\r\n"


@attrs.define
class Load:
    """``CLIENTS`` threads sending continuously until the server goes away."""

    port: int
    acked: set[tuple[int, int]] = attrs.field(factory=set)
    attempted: set[tuple[int, int]] = attrs.field(factory=set)
    unexpected: list[BaseException] = attrs.field(factory=list)
    _changed: threading.Condition = attrs.field(factory=threading.Condition)

    def client(self, client: int) -> None:
        n = 0
        try:
            while True:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
                    for _ in range(10):
                        with self._changed:
                            self.attempted.add((client, n))
                        smtp.sendmail("a@example.com", ["b@example.com"], body(client, n))
                        with self._changed:
                            self.acked.add((client, n))
                            self._changed.notify_all()
                        n += 1
        except (OSError, smtplib.SMTPServerDisconnected):
            return  # the server is gone: stop sending
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code != 421:  # 421 4.3.2: shutting down
                self.unexpected.append(exc)
        except BaseException as exc:
            self.unexpected.append(exc)

    def wait_for_acks(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.acked) >= count, timeout=60)


def stored(maildir: Path) -> dict[tuple[int, int], bytes]:
    messages: dict[tuple[int, int], bytes] = {}
    for path in (maildir / "new").iterdir():
        content = path.read_bytes()
        seq = re.search(rb"X-Seq: (\d+)-(\d+)\r\n", content)
        assert seq is not None, f"{path.name}: not one of ours, or truncated"
        key = (int(seq[1]), int(seq[2]))
        assert key not in messages, f"{key} stored twice"
        messages[key] = content
    return messages


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_every_acknowledged_message_is_in_new_complete_and_byte_exact(
    tmp_path: Path, signum: signal.Signals
) -> None:
    with run("--maildir", "box", "--shutdown-grace", "10", cwd=tmp_path) as server:
        load = Load(server.port)
        threads = [threading.Thread(target=load.client, args=(c,)) for c in range(CLIENTS)]
        for thread in threads:
            thread.start()
        load.wait_for_acks(ACKED_BEFORE_THE_SIGNAL)
        server.process.send_signal(signum)
        status = server.process.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=60)
    assert not load.unexpected, load.unexpected[:3]
    messages = stored(tmp_path / "box")
    # Every 250 a client saw: in new/, complete (the Received: header, then exactly the body).
    for key in load.acked:
        assert key in messages, f"{key} was acknowledged but is not in new/"
        content = messages[key]
        assert content.startswith(b"Received: ") and content.endswith(body(*key))
        assert len(content) - content.index(b"X-Seq: ") == len(body(*key))
    # Whatever else is in new/ was sent, and is complete too (fsync before the rename).
    assert set(messages) <= load.attempted
    for key, content in messages.items():
        assert content.endswith(body(*key))
    if signum == signal.SIGTERM:
        assert status == 0
        # A graceful stop lets each transaction finish and its 250 reach the client: nothing
        # stored that its client does not know about (no duplicate on the client's retry).
        assert set(messages) == load.acked
    else:
        assert status == -signal.SIGKILL


# -- the system calls behind a 250 -------------------------------------------------------------

# strace's lines: "PID name(args) = result", or the call cut in two by another thread's:
# "PID name(args <unfinished ...>" then "PID <... name resumed>args) = result".
_CALL = re.compile(r"^(\d+) +(\w+)\((.*)\) += (-?\d+|\?)")
_UNFINISHED = re.compile(r"^(\d+) +(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>(.*)\) += (-?\d+|\?)")
TRACED = "openat,open,creat,write,writev,pwrite64,sendto,sendmsg,fsync,fdatasync,rename,renameat,renameat2,close"


@attrs.frozen
class Call:
    name: str
    args: str
    result: int


def completed_calls(trace: str) -> list[Call]:
    """The system calls of every thread, in the order they returned."""
    calls: list[Call] = []
    pending: dict[tuple[str, str], str] = {}
    for line in trace.splitlines():
        if match := _UNFINISHED.match(line):
            pending[(match[1], match[2])] = match[3]
        elif match := _RESUMED.match(line):
            head = pending.pop((match[1], match[2]), "")
            if match[4] != "?":
                calls.append(Call(match[2], head + match[3], int(match[4])))
        elif (match := _CALL.match(line)) and match[4] != "?":
            calls.append(Call(match[2], match[3], int(match[4])))
    return calls


def first(
    calls: list[Call], start: int, test: Callable[[Call], bool], what: str, end: int | None = None
) -> int:
    """The index of the first call from ``start`` (up to ``end``) that passes ``test``."""
    for index in range(start, len(calls) if end is None else end):
        if test(calls[index]):
            return index
    raise AssertionError(f"no {what} between calls {start} and {end or len(calls)}")


def fd_of(call: Call) -> str:
    return call.args.split(",", 1)[0]


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_the_250_comes_after_write_fsync_rename_and_the_fsync_of_new(
    tmp_path: Path, loop: str
) -> None:
    """RFC 5321 6.1: the 250 takes responsibility for the message, so the system calls must
    make it durable first: the file in tmp/ written and fsynced, renamed into new/, new/
    fsynced (the rename itself is on disk only then) -- and only then the reply is sent.
    A SIGKILL test cannot tell a missing fsync (the page cache survives it); the calls can."""
    if shutil.which("strace") is None:
        need("strace", "apt-get install strace")
    trace_file = tmp_path / "trace.txt"
    wrapper = ("strace", "-f", "-qq", "-s", "80", "-e", f"trace={TRACED}", "-o", str(trace_file))
    with run("--maildir", "box", "--loop", loop, cwd=tmp_path, wrapper=wrapper) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.sendmail("a@example.com", ["b@example.com"], body(0, 1))
        tracees = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        (minismtp_pid,) = tracees.read_text().split()  # strace's child: the server
        os.kill(int(minismtp_pid), signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.output
    calls = completed_calls(trace_file.read_text())
    (stored,) = (tmp_path / "box" / "new").iterdir()
    name = stored.name
    opened = first(
        calls,
        0,
        lambda c: (
            c.name in ("openat", "open", "creat")
            and f'tmp/{name}"' in c.args
            and "O_CREAT" in c.args
            and c.result >= 0
        ),
        f"open of tmp/{name}",
    )
    fd = str(calls[opened].result)
    # Between the open and the close of the file (its number may be reused after).
    closed = first(
        calls, opened, lambda c: c.name == "close" and fd_of(c) == fd, "close of the file"
    )
    written = first(
        calls,
        opened,
        lambda c: c.name in ("write", "pwrite64", "writev") and fd_of(c) == fd and c.result > 0,
        "write of the file",
        closed,
    )
    synced = first(
        calls,
        written,
        lambda c: c.name in ("fsync", "fdatasync") and fd_of(c) == fd and c.result == 0,
        "fsync of the file",
        closed,
    )
    assert not any(
        c.name in ("write", "pwrite64", "writev") and fd_of(c) == fd for c in calls[synced:closed]
    )
    renamed = first(
        calls,
        synced,
        lambda c: (
            c.name.startswith("rename")
            and f'tmp/{name}"' in c.args
            and f'new/{name}"' in c.args
            and c.result == 0
        ),
        "rename into new/",
    )
    new_opened = first(
        calls,
        renamed,
        lambda c: (
            c.name in ("openat", "open")
            and re.search(r'"[^"]*new/?"', c.args) is not None
            and "O_DIRECTORY" in c.args
            and c.result >= 0
        ),
        "open of new/",
    )
    new_fd = str(calls[new_opened].result)
    new_synced = first(
        calls,
        new_opened,
        lambda c: c.name in ("fsync", "fdatasync") and fd_of(c) == new_fd and c.result == 0,
        "fsync of new/",
    )
    replied = first(
        calls,
        0,
        lambda c: (
            c.name in ("write", "writev", "sendto", "sendmsg")
            and "250 2.0.0 OK queued as" in c.args
        ),
        "the 250",
    )
    assert opened < written < synced < renamed < new_synced < replied
