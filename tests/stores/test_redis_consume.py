"""The Consumer of ``minismtp consume``, in process, against a real redis-server: the Message
its hooks get, failing hooks, the dead-letter stream, slow hooks that must not be claimed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from minismtp import App, Message
from minismtp.consume import Consumer
from minismtp.stores.redis import RedisStreamStore
from tests.helpers.backends import with_uvloop
from tests.helpers.redis_server import TRACE, RedisServer, make_message

pytestmark = pytest.mark.anyio


@pytest.fixture(params=with_uvloop(), scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


async def put(server: RedisServer, stream: str, *contents: bytes, **options: Any) -> list[str]:
    async with RedisStreamStore.from_url(server.url(stream, **options)) as store:
        ids = []
        for content in contents:
            message = make_message(content, tls=True)
            await store.put(message)
            ids.append(message.id)
        return ids


@asynccontextmanager
async def consuming(
    app: App, server: RedisServer, stream: str, **options: Any
) -> AsyncIterator[Consumer]:
    options.setdefault("block", 0.05)  # how soon a stop is noticed
    consumer = Consumer.from_url(app, server.url(stream, group="g"), **options)
    async with anyio.create_task_group() as tasks:
        await tasks.start(consumer.run)
        try:
            yield consumer
        finally:
            consumer.stop()


async def until(check: Callable[[], Any]) -> None:
    """Poll ``check`` (what it reads is in Redis: no event to wait on), for 10 s at most."""
    with anyio.fail_after(10):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def redis(server: RedisServer) -> Any:
    return server.client()


async def test_hooks_get_the_message_as_the_channel_gives_it(
    redis_server: RedisServer, stream: str
) -> None:
    content = b"Subject: s\r\n\r\nbody\r\n"
    big = b"x" * 78 + b"\r\n"
    [small_id, big_id] = await put(redis_server, stream, content, big * 2000, inline_max=1000)
    app = App()
    got: list[Message] = []
    contents: list[tuple[bytes, bytes, bool]] = []

    @app.on_message
    async def keep(message: Message) -> None:
        # The message is closed once the hooks return: what outlives them is copied.
        got.append(message)
        contents.append((message.data, message.original, message.path is not None))

    async with consuming(app, redis_server, stream):
        await until(lambda: len(got) == 2)
    small, large = got
    assert (small.id, large.id) == (small_id, big_id)
    assert contents[0] == (TRACE + content, content, False)
    assert contents[1] == (TRACE + big * 2000, big * 2000, True)  # read from a spool file
    assert large.closed  # its spool file is gone with the hooks done
    assert small.size == len(content)
    assert str(small.mail_from) == "alice@example.org"
    assert [str(r) for r in small.rcpt_to] == ["bob@example.com", "carol@example.com"]
    assert small.peer == ("127.0.0.1", 40000) and small.helo_name == "client.example.org"
    assert small.tls is not None and small.tls.version == "TLSv1.3"
    assert small.mail_params == {"BODY": "8BITMIME"}
    assert small.rcpt_params == ({}, {"NOTIFY": "NEVER"})
    client = redis(redis_server)
    assert client.xlen(stream) == 0 and client.keys(f"{stream}:body:*") == []
    client.close()


async def test_a_failing_hook_is_retried_then_dead_lettered(
    redis_server: RedisServer, stream: str
) -> None:
    [message_id] = await put(redis_server, stream, b"Subject: poison\r\n\r\n")
    app = App()
    calls: list[str] = []

    @app.on_message
    def fail(message: Message) -> None:
        calls.append(message.id)
        raise RuntimeError("cannot handle this one")

    client = redis(redis_server)
    async with consuming(app, redis_server, stream, claim_after=0.05, max_deliveries=3) as consumer:
        await until(lambda: client.xlen(f"{stream}:dead") == 1)
    assert calls == [message_id] * 3
    assert (consumer.failed, consumer.dead, consumer.handled) == (3, 1, 0)
    [(_, fields)] = client.xrange(f"{stream}:dead")
    assert fields[b"id"] == message_id.encode()
    assert fields[b"dead_reason"] == b"delivered 4 times without success"
    assert fields[b"dead_stream"] == stream.encode()
    assert client.xlen(stream) == 0
    assert client.xpending(stream, "g")["pending"] == 0
    client.close()


async def test_a_malformed_entry_goes_to_the_dead_letters_at_once(
    redis_server: RedisServer, stream: str
) -> None:
    client = redis(redis_server)
    client.xadd(stream, {"id": "X", "rcpt_to": "not json", "body": "b"})
    client.xadd(stream, {"id": "Y", "body_key": f"{stream}:body:gone"})
    app = App()
    got: list[Message] = []
    app.on_message(got.append)
    async with consuming(app, redis_server, stream):
        await until(lambda: client.xlen(f"{stream}:dead") == 2)
    reasons = [fields[b"dead_reason"] for _, fields in client.xrange(f"{stream}:dead")]
    assert b"is malformed" in reasons[0]
    assert reasons[1] == b"its body key is gone"
    assert got == []
    client.close()


async def test_a_slow_hook_keeps_its_entry_from_other_consumers(
    redis_server: RedisServer, stream: str
) -> None:
    """The entry's idle time is reset while the hooks run: claim_after is for dead consumers."""
    [message_id] = await put(redis_server, stream, b"Subject: slow\r\n\r\n")
    app = App()
    calls: list[str] = []
    started = anyio.Event()

    @app.on_message
    async def slow(message: Message) -> None:
        calls.append(message.id)
        started.set()
        await anyio.sleep(0.6)  # three times claim_after: the other consumer would claim it

    async with consuming(app, redis_server, stream, claim_after=0.2, name="one") as one:
        with anyio.fail_after(10):
            await started.wait()
        async with consuming(app, redis_server, stream, claim_after=0.2, name="two") as two:
            # A claim by "two" (idle > 0.2 s, looked for every 0.1 s) would have called the
            # hook again before "one" is done at 0.6 s; after that the entry is gone.
            await until(lambda: one.handled == 1)
    assert calls == [message_id]
    assert two.handled == 0


async def test_the_consumer_waits_for_redis_to_come_back(
    own_redis: RedisServer, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()
    got: list[str] = []

    @app.on_message
    def keep(message: Message) -> None:
        got.append(message.id)

    async with consuming(app, own_redis, stream, backoff_max=0.05):
        own_redis.stop()
        await until(lambda: any("failed" in r.getMessage() for r in caplog.records))
        own_redis.start()
        [message_id] = await put(own_redis, stream, b"Subject: back\r\n\r\n")
        await until(lambda: got == [message_id])
    messages = [r.getMessage() for r in caplog.records if r.name == "minismtp.consume"]
    assert sum("failed" in m for m in messages) == 1, messages
    assert sum("works again" in m for m in messages) == 1, messages
