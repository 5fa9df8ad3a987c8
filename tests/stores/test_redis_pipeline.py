"""MX processes -> Redis stream -> ``minismtp consume``, through real subprocesses, with faults.

Every test here runs real ``minismtp run --store redis://...`` and ``minismtp consume``
processes against a real redis-server (see tests/helpers/redis_server.py)."""

from __future__ import annotations

import base64
import os
import re
import signal
import smtplib
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers.processes import LISTENING
from tests.helpers.processes import spawned as minismtp
from tests.helpers.redis_apps import handled
from tests.helpers.redis_server import RedisServer

CONSUMING = r"^minismtp consuming stream"
T = TypeVar("T")


def small_content(n: int = 0) -> bytes:
    """CRLF lines, 8-bit octets and lines that start with a dot (stuffed on the wire)."""
    return (
        f"From: a@example.org\r\nSubject: message {n}\r\n\r\n".encode()
        + b".a line that starts with a dot\r\n..two dots\r\n\xc3\xa9t\xc3\xa9 8-bit\r\n"
        + f"{n}\r\n".encode() * 3
    )


@pytest.fixture(scope="module")
def big_content() -> bytes:
    """30 MB: base64 lines of random octets, every 1,000th line starting with a dot."""
    raw = base64.encodebytes(os.urandom(22_500_000)).replace(b"\n", b"\r\n")
    lines = raw.split(b"\r\n")
    lines[::1000] = [b"." + line for line in lines[::1000]]
    return b"Subject: big\r\n\r\n" + b"\r\n".join(lines)


def deliver(client: smtplib.SMTP, content: bytes) -> str:
    """Send one message on an open session; the id of its 250 (SMTPDataError if not 250)."""
    client.ehlo_or_helo_if_needed()
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt("b@example.com")[0] == 250
    code, text = client.data(content)
    if code != 250:
        raise smtplib.SMTPDataError(code, text)
    match = re.search(rb"queued as (\w+)", text)
    assert match, text
    return match.group(1).decode()


def send(port: int, content: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        return deliver(client, content)


def until(check: Callable[[], T], timeout: float = 20, what: str = "") -> T:
    """Poll ``check`` until it returns something true; its value (AssertionError at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.02)


def stream_bodies(server: RedisServer, stream: str) -> dict[str, tuple[bytes, int]]:
    """message id -> (whole stored message, size field) for every entry of ``stream``."""
    client = server.client()
    try:
        found = {}
        for _, fields in client.xrange(stream):
            body = fields.get(b"body")
            if body is None:
                body = client.get(fields[b"body_key"])
            found[fields[b"id"].decode()] = (body, int(fields[b"size"]))
        return found
    finally:
        client.close()


def assert_stored(whole: bytes, content: bytes) -> None:
    """``whole`` is our Received: header, then ``content`` byte for byte."""
    assert whole.startswith(b"Received: from ")
    assert len(whole) > len(content) and whole[len(whole) - len(content) :] == content
    trace = whole[: len(whole) - len(content)]
    assert trace.endswith(b"\r\n") and b"\r\n\r\n" not in trace


def consume(url: str, out: Path, *options: str, **env: str) -> Any:
    return minismtp(
        "consume",
        url,
        "tests.helpers.redis_apps:recorder",
        *options,
        env={"MINISMTP_TEST_OUT": str(out), **env},
        ready=CONSUMING,
    )


def pending(server: RedisServer, stream: str, group: str) -> int:
    client = server.client()
    try:
        return int(client.xpending(stream, group)["pending"])
    finally:
        client.close()


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_round_trip_is_byte_exact(
    loop: str, redis_server: RedisServer, stream: str, big_content: bytes, tmp_path: Path
) -> None:
    """Small and 30 MB messages: SMTP -> stream -> minismtp consume, on one loop throughout."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    url = redis_server.url(stream)
    contents = [small_content(1), big_content, small_content(2)]
    with minismtp("run", "--port", "0", "--loop", loop, "--store", url, ready=LISTENING) as mx:
        ids = [send(mx.port, content) for content in contents]
        assert mx.stop() == 0
    stored = stream_bodies(redis_server, stream)
    client = redis_server.client()
    assert client.xrange(stream)[1][1].keys() >= {b"body_key"}  # 30 MB: not inline
    client.close()
    for message_id, content in zip(ids, contents, strict=True):
        assert_stored(stored[message_id][0], content)
        assert stored[message_id][1] == len(content)
    spool = tmp_path / "spool"
    spool.mkdir()
    with consume(f"{url}&group=g", tmp_path, "--loop", loop, "--spool-dir", str(spool)) as consumer:
        until(lambda: len(handled(tmp_path)) == 3, what="3 messages handled")
        assert consumer.stop() == 0
    assert list(spool.iterdir()) == []  # the 30 MB body's copy went with its message
    assert [mid for _, mid in handled(tmp_path)] == ids  # in stream order
    for message_id in ids:
        (path,) = tmp_path.glob(f"{message_id}.*")
        assert path.read_bytes() == stored[message_id][0]
    # Acknowledged and deleted, bodies too.
    client = redis_server.client()
    assert client.xlen(stream) == 0
    assert client.keys(f"{stream}:body:*") == []
    client.close()


def test_two_mx_instances_and_two_consumers_handle_each_message_once(
    redis_server: RedisServer, stream: str, tmp_path: Path
) -> None:
    """`--workers 2` and a second instance feed one stream; two consumers share one group."""
    url = redis_server.url(stream)
    total = 60
    with (
        minismtp("run", "--port", "0", "--workers", "2", "--store", url, ready=LISTENING) as one,
        minismtp("run", "--port", "0", "--loop", "trio", "--store", url, ready=LISTENING) as two,
        consume(f"{url}&group=workers", tmp_path, "--loop", "trio") as first,
        consume(f"{url}&group=workers", tmp_path, "--loop", "asyncio") as second,
    ):
        sent: list[str] = []
        lock = threading.Lock()

        def client(port: int, count: int, offset: int) -> None:
            for n in range(count):  # a session each: --workers spreads sessions, not messages
                message_id = send(port, small_content(offset + n))
                with lock:
                    sent.append(message_id)

        threads = [
            threading.Thread(target=client, args=(port, total // 6, k * total // 6))
            for k, port in enumerate([one.port, two.port] * 3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(sent) == total
        until(lambda: len(handled(tmp_path)) >= total, what=f"{total} messages handled")
        # Nothing pending and nothing left to read: no delivery can come after this.
        until(lambda: pending(redis_server, stream, "workers") == 0, what="no entry pending")
        client_ = redis_server.client()
        assert client_.xlen(stream) == 0
        client_.close()
        assert first.stop() == 0 and second.stop() == 0
        assert one.stop() == 0 and two.stop() == 0
    records = handled(tmp_path)
    assert sorted(mid for _, mid in records) == sorted(sent)  # each once, none missing
    workers = {line for line in one.stderr if "worker" in line and "serving" in line}
    assert len(workers) == 2, one.output


# -- faults ---------------------------------------------------------------------------------


def test_sigkill_of_the_mx_under_load_loses_no_acknowledged_message(
    redis_server: RedisServer, stream: str
) -> None:
    """20 clients sending; SIGKILL; every message that got its 250 is in the stream, exact."""
    url = redis_server.url(stream)
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def client(k: int, port: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as session:
                for n in range(10_000):
                    content = (
                        small_content(k * 100_000 + n) + os.urandom(300).hex().encode() + b"\r\n"
                    )
                    message_id = deliver(session, content)
                    with lock:
                        acknowledged[message_id] = content
                        if len(acknowledged) >= 300:
                            enough.set()
        except (OSError, smtplib.SMTPException):
            return  # the server is gone

    with minismtp("run", "--port", "0", "--store", url, ready=LISTENING) as mx:
        threads = [threading.Thread(target=client, args=(k, mx.port)) for k in range(20)]
        for thread in threads:
            thread.start()
        assert enough.wait(30), "300 messages acknowledged"
        mx.send_signal(signal.SIGKILL)
        mx.process.wait(10)
        for thread in threads:
            thread.join(30)
    with lock:
        sent = dict(acknowledged)
    stored = stream_bodies(redis_server, stream)
    missing = [mid for mid in sent if mid not in stored]
    assert not missing, f"{len(missing)} of {len(sent)} acknowledged messages missing"
    for message_id, content in sent.items():
        assert_stored(stored[message_id][0], content)


def test_sigkill_of_redis_keeps_every_acknowledged_message(
    own_redis: RedisServer, stream: str
) -> None:
    """appendfsync always: what Redis acknowledged (and so what got a 250) survives SIGKILL."""
    url = own_redis.url(stream)
    with minismtp("run", "--port", "0", "--store", url, ready=LISTENING) as mx:
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=30) as session:
            sent = {deliver(session, small_content(n)): small_content(n) for n in range(50)}
        own_redis.kill()
        own_redis.start()  # the same port and files
        stored = stream_bodies(own_redis, stream)
        assert sorted(stored) == sorted(sent)
        for message_id, content in sent.items():
            assert_stored(stored[message_id][0], content)


def test_redis_stopped_means_451_and_the_mx_recovers_by_itself(
    own_redis: RedisServer, stream: str
) -> None:
    url = own_redis.url(stream)
    with minismtp("run", "--port", "0", "--store", url, ready=LISTENING) as mx:
        first = send(mx.port, small_content(1))
        own_redis.stop()
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=30) as session:
            for n in range(3):  # the session goes on after each 451
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    deliver(session, small_content(n))
                assert refused.value.smtp_code == 451
            own_redis.start()

            def delivered() -> str | None:
                try:
                    return deliver(session, small_content(9))
                except smtplib.SMTPDataError as exc:
                    assert exc.smtp_code == 451
                    session.rset()
                    return None

            last = until(delivered, what="a 250 once Redis is back")
        assert mx.stop() == 0
    assert sorted(stream_bodies(own_redis, stream)) == sorted([first, last])
    failed = [line for line in mx.stderr if "minismtp.stores.redis" in line and "failed:" in line]
    back = [line for line in mx.stderr if "works again after" in line]
    assert len(failed) == 1 and len(back) == 1, mx.output
    # One line when Redis failed, one when it was back: no traceback per refused message.
    assert not any("Traceback" in line for line in mx.stderr), mx.output


def test_a_consumer_killed_mid_message_has_it_claimed_by_another(
    redis_server: RedisServer, stream: str, tmp_path: Path
) -> None:
    url = redis_server.url(stream)
    with minismtp("run", "--port", "0", "--store", url, ready=LISTENING) as mx:
        message_id = send(mx.port, small_content(1))
        assert mx.stop() == 0
    group = f"{url}&group=g"
    with consume(group, tmp_path, "--claim-after", "0.5", MINISMTP_TEST_HANG="1") as doomed:
        until(lambda: (tmp_path / f"{message_id}.started").exists(), what="the hook to start")
        doomed.send_signal(signal.SIGKILL)
        doomed.process.wait(10)
    assert handled(tmp_path) == []
    with consume(group, tmp_path, "--claim-after", "0.5") as survivor:
        until(lambda: handled(tmp_path), what="the message handled by the second consumer")
        until(lambda: pending(redis_server, stream, "g") == 0, what="nothing pending")
        assert survivor.stop() == 0
    assert handled(tmp_path) == [(survivor.process.pid, message_id)]
    assert any("claimed after 0.5 s idle (delivery 2)" in line for line in survivor.stderr)


def test_sigterm_finishes_the_message_in_hand_then_exits_0(
    redis_server: RedisServer, stream: str, tmp_path: Path
) -> None:
    url = redis_server.url(stream)
    with minismtp("run", "--port", "0", "--store", url, ready=LISTENING) as mx:
        first, second = send(mx.port, small_content(1)), send(mx.port, small_content(2))
        assert mx.stop() == 0
    release = tmp_path / "release"
    with consume(f"{url}&group=g", tmp_path, MINISMTP_TEST_HOLD=str(release)) as consumer:
        until(lambda: (tmp_path / f"{first}.started").exists(), what="the hook to start")
        consumer.send_signal(signal.SIGTERM)
        consumer.wait_for("stderr", "SIGTERM: finishing the message in hand")
        release.touch()
        assert consumer.process.wait(20) == 0
    assert handled(tmp_path) == [(consumer.process.pid, first)]
    client = redis_server.client()
    assert [fields[b"id"].decode() for _, fields in client.xrange(stream)] == [second]
    assert pending(redis_server, stream, "g") == 0
    client.close()


# -- the command line -----------------------------------------------------------------------


def test_store_problems_at_startup_are_one_line_and_status_2(
    redis_server: RedisServer, own_redis: RedisServer, tmp_path: Path
) -> None:
    own_redis.stop()
    down = own_redis.url("s")
    cases = [
        (("run", "--store", down), "--store: cannot reach Redis at 127.0.0.1:"),
        (("run", "--store", "redis://localhost/x"), "the database must be a number"),
        (("run", "--store", "ftp://host/"), "is not a store URL"),
        (("run", "--store", redis_server.url("s"), "--maildir", "m"), "mutually exclusive"),
        (("consume", down, "tests.helpers.redis_apps:recorder"), "cannot use Redis at"),
        (("consume", "redis://h/0?wait=1", "tests.helpers.redis_apps:recorder"), "is for a store"),
    ]
    with ExitStack() as stack:  # all at once: each pays the interpreter's start-up
        processes = [
            stack.enter_context(minismtp(*args, *(["--port", "0"] if args[0] == "run" else [])))
            for args, _ in cases
        ]
        for process, (_, error) in zip(processes, cases, strict=True):
            assert process.process.wait(30) == 2
            process.wait_for("stderr", re.escape(error))
            assert len(process.stderr) == 1, process.output
