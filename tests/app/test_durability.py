"""Nothing acknowledged is lost: ``minismtp run --maildir`` killed under load (SIGKILL), and
stopped under load (SIGTERM). A ``250`` after DATA (RFC 5321 4.1.1.4, 6.1: the server takes
responsibility for the message) promises a message complete and byte-exact in ``new/``."""

from __future__ import annotations

import re
import signal
import smtplib
import threading
from pathlib import Path

import attrs
import pytest

from tests.helpers.processes import run

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
