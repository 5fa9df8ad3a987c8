"""RedisStreamStore against a real redis-server: the entry, big bodies, failures, recovery."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import pytest

from minismtp.stores.redis import RedisStreamStore, RedisURL, StoreUnavailable
from tests.helpers.backends import with_uvloop
from tests.helpers.redis_server import TRACE, RedisServer, make_message, redis_server_binary

pytestmark = pytest.mark.anyio


@pytest.fixture(params=with_uvloop(), scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def entries(server: RedisServer, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    client = server.client()
    try:
        return [(entry_id, fields) for entry_id, fields in client.xrange(stream)]
    finally:
        client.close()


async def test_one_entry_per_message_with_the_envelope(
    redis_server: RedisServer, stream: str
) -> None:
    content = b"Subject: hi\r\n\r\nbody \xff\x00 bytes\r\n"
    message = make_message(content, tls=True)
    async with RedisStreamStore.from_url(redis_server.url(stream)) as store:
        assert await store.put(message) is None
    [(_, fields)] = entries(redis_server, stream)
    assert fields[b"id"] == message.id.encode()
    assert fields[b"body"] == TRACE + content  # byte-exact, our trace header first
    assert b"body_key" not in fields
    assert fields[b"mail_from"] == b"alice@example.org"
    assert json.loads(fields[b"rcpt_to"]) == ["bob@example.com", "carol@example.com"]
    assert fields[b"peer"] == b"127.0.0.1:40000"
    assert fields[b"helo"] == b"client.example.org"
    assert fields[b"tls"] == b"1"
    assert fields[b"tls_version"] == b"TLSv1.3"
    assert abs(float(fields[b"received_at"]) - message.received_at) < 1e-5
    assert int(fields[b"size"]) == len(content)
    assert json.loads(fields[b"mail_params"]) == {"BODY": "8BITMIME"}
    assert json.loads(fields[b"rcpt_params"]) == [{}, {"NOTIFY": "NEVER"}]


async def test_a_big_body_goes_in_a_key_that_does_not_expire(
    redis_server: RedisServer, stream: str
) -> None:
    content = bytes(range(256)) * 1000  # 256 KB, over inline_max: 9 pieces of 30,000
    store = RedisStreamStore.from_url(redis_server.url(stream, inline_max=100_000))
    store.piece_size = 30_000
    async with store:
        await store.put(make_message(content))
    [(_, fields)] = entries(redis_server, stream)
    assert b"body" not in fields
    key = fields[b"body_key"]
    client = redis_server.client()
    assert client.get(key) == TRACE + content
    assert client.ttl(key) == -1  # persisted in the MULTI that added the entry
    client.close()


async def test_a_refused_entry_leaves_no_body_behind(
    redis_server: RedisServer, stream: str
) -> None:
    client = redis_server.client()
    client.set(stream, "not a stream")  # XADD fails inside the MULTI: WRONGTYPE
    store = RedisStreamStore(redis_server.url(stream).split("?")[0], stream=stream, inline_max=10)
    store._link = None
    with pytest.raises(OSError, match="is a string, not a stream"):
        await store.open()
    # Past open()'s check (the key changed type afterwards): put refuses, the body key goes.
    client.delete(stream)
    async with store:
        client.set(stream, "not a stream")
        message = make_message(b"x" * 100)
        with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
            await store.put(message)
    assert client.exists(f"{stream}:body:{message.id}") == 0
    client.close()


async def put_once_it_works(store: RedisStreamStore, body: bytes) -> None:
    """Store ``body`` at the first try that Redis takes (within 10 s): the store recovers."""
    with anyio.fail_after(10):
        while True:
            try:
                await store.put(make_message(body))
                return
            except StoreUnavailable:
                await anyio.sleep(0.02)


async def test_unreachable_redis_is_a_451_and_one_log_line_each_way(
    own_redis: RedisServer, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "minismtp.stores.redis")
    store = RedisStreamStore.from_url(own_redis.url(stream))
    store.backoff = store.backoff_max = 0.05
    async with store:
        await store.put(make_message(b"before\r\n"))
        own_redis.stop()
        for _ in range(5):  # tried, or refused at once within the backoff: 451 each time
            with anyio.fail_after(10), pytest.raises(StoreUnavailable):
                await store.put(make_message(b"during\r\n"))
        own_redis.start()
        await put_once_it_works(store, b"after\r\n")
    lines = [r.getMessage() for r in caplog.records if r.name == "minismtp.stores.redis"]
    assert [line.split(" ", 4)[3] for line in lines[1:]] == ["failed:", "works"], lines
    assert "answered 451" in lines[-1]
    bodies = [fields[b"body"][len(TRACE) :] for _, fields in entries(own_redis, stream)]
    assert bodies == [b"before\r\n", b"after\r\n"]


async def test_a_redis_that_does_not_answer_is_a_451_after_the_timeout(
    own_redis: RedisServer, stream: str
) -> None:
    """``timeout=`` bounds the wait for a reply: Redis holding every write (CLIENT PAUSE, 3 s)
    gives a 451 well before it lets go, and the store works again once it does."""
    client = own_redis.client()
    store = RedisStreamStore.from_url(own_redis.url(stream, timeout=0.3))
    store.backoff = store.backoff_max = 0.01
    async with store:
        await store.put(make_message(b"before\r\n"))
        client.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        try:
            with anyio.fail_after(2), pytest.raises(StoreUnavailable):
                await store.put(make_message(b"during\r\n"))
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
        await put_once_it_works(store, b"after\r\n")
    client.close()
    bodies = [fields[b"body"][len(TRACE) :] for _, fields in entries(own_redis, stream)]
    # The refused message may still land once Redis lets go (it had been sent): at least
    # once, as the README says; the others exactly once, in order.
    assert [b for b in bodies if b != b"during\r\n"] == [b"before\r\n", b"after\r\n"]


async def test_read_only_and_out_of_memory_are_451(redis_server: RedisServer, stream: str) -> None:
    client = redis_server.client()
    store = RedisStreamStore.from_url(redis_server.url(stream))
    store.backoff = store.backoff_max = 0.01
    async with store:
        client.config_set("maxmemory", 1)  # every write is refused: OOM
        try:
            with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
                await store.put(make_message(b"x\r\n"))
        finally:
            client.config_set("maxmemory", 0)
        await anyio.sleep(0.02)  # past the backoff
        client.replicaof("127.0.0.1", 1)  # a replica of nothing: read-only
        try:
            with pytest.raises(StoreUnavailable, match="ReadOnlyError"):
                await store.put(make_message(b"x\r\n"))
        finally:
            client.replicaof("NO", "ONE")
        await anyio.sleep(0.02)
        await store.put(make_message(b"y\r\n"))
    assert len(entries(redis_server, stream)) == 1
    client.close()


async def test_too_few_replicas_is_a_451(redis_server: RedisServer, stream: str) -> None:
    async with RedisStreamStore.from_url(
        redis_server.url(stream, wait=1, wait_timeout=50)
    ) as store:
        with pytest.raises(StoreUnavailable, match="WAIT: 0 of 1 replica"):
            await store.put(make_message(b"x\r\n"))


@pytest.mark.parametrize(
    "url, error",
    [
        ("http://localhost/", "not a Redis URL"),
        ("redis://", "no host"),
        ("redis://localhost:notaport/0", "not a valid Redis URL"),
        ("redis://localhost/zero", "database must be a number"),
        ("redis://localhost/0?stream=", "stream= must not be empty"),
        ("redis://localhost/0?wait=-1", "wait='-1' is not a whole number"),
        ("redis://localhost/0?waitaof=2,0", "waitaof='2,0' must be L,R"),
        ("redis://localhost/0?timeout=0", "timeout='0' is not a number of seconds"),
        ("redis://localhost/0?group=workers", "group= is for minismtp consume"),
    ],
)
def test_bad_urls_say_why(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RedisStreamStore.from_url(url)


def test_url_options_are_ours_the_rest_goes_to_redis_py() -> None:
    parsed = RedisURL.parse("redis://:secret@h:6380/2?stream=s&wait=1&health_check_interval=5")
    assert parsed.connect == "redis://:secret@h:6380/2?health_check_interval=5"
    assert parsed.options == {"stream": "s", "wait": "1"}
    assert parsed.where == "h:6380"
    store = RedisStreamStore.from_url("redis://user:secret@h:6380/2")
    assert "secret" not in repr(store) and "user:***@h:6380" in repr(store)


async def test_concurrent_messages_share_pipelines_and_all_land(
    redis_server: RedisServer, stream: str
) -> None:
    """Group commit: with 2 pipelines on their way at most, 100 concurrent puts still each get
    their own outcome (here: all stored, once each, in the stream)."""
    store = RedisStreamStore.from_url(redis_server.url(stream))
    store.max_in_flight = 2
    messages = [make_message(b"n=%d\r\n" % n) for n in range(100)]
    async with store, anyio.create_task_group() as tasks:
        for message in messages:
            tasks.start_soon(store.put, message)
    stored = [fields[b"id"].decode() for _, fields in entries(redis_server, stream)]
    assert sorted(stored) == sorted(message.id for message in messages)


async def test_a_failed_pipeline_fails_every_message_in_it(
    redis_server: RedisServer, stream: str
) -> None:
    store = RedisStreamStore.from_url(redis_server.url(stream, wait=1, wait_timeout=20))
    store.max_in_flight = 1
    store.backoff = 0  # no refusal at once after the first failure: each goes to Redis
    failures: list[BaseException] = []

    async def put(content: bytes) -> None:
        try:
            await store.put(make_message(content))
        except StoreUnavailable as exc:
            failures.append(exc)

    async with store, anyio.create_task_group() as tasks:
        for n in range(10):
            tasks.start_soon(put, b"n=%d\r\n" % n)
    assert len(failures) == 10  # no replica acknowledged: none of them gets a 250


def test_without_redis_server_the_tests_skip_but_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not available"):
        redis_server_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: every test must run"):
        redis_server_binary()


async def test_waitaof_needs_redis_7_2(redis_server: RedisServer, stream: str) -> None:
    client = redis_server.client()
    version = tuple(int(n) for n in client.info("server")["redis_version"].split(".")[:2])
    client.close()
    store = RedisStreamStore.from_url(redis_server.url(stream, waitaof="1,0"))
    if version >= (7, 2):  # this server has WAITAOF: the AOF is fsynced before the 250
        async with store:
            await store.put(make_message(b"x\r\n"))
        assert len(entries(redis_server, stream)) == 1
    else:
        with pytest.raises(OSError, match=r"waitaof= needs Redis 7\.2 or later"):
            await store.open()


async def test_wait_for_a_replica(
    own_redis: RedisServer, stream: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """wait=1: the 250 waits for a replica to have the entry, and then it has it."""
    primary = own_redis.client()
    primary.config_set("repl-diskless-sync-delay", 0)  # the first sync at once, not in 5 s
    primary.close()
    replica = RedisServer(
        own_redis.binary,
        tmp_path_factory.mktemp("replica"),
        extra=("--replicaof", "127.0.0.1", str(own_redis.port)),
    )
    replica.start()
    try:
        client = replica.client()
        with anyio.fail_after(10):
            while client.info("replication")["master_link_status"] != "up":  # noqa: ASYNC110
                await anyio.sleep(0.02)
        # A long wait timeout: on a loaded machine the replica may take more than a second.
        url = own_redis.url(stream, wait=1, wait_timeout=10_000)
        async with RedisStreamStore.from_url(url) as store:
            message = make_message(b"replicated\r\n")
            await store.put(message)
        # WAIT returned: the replica has the entry now, without waiting any further.
        [(_, fields)] = client.xrange(stream)
        assert fields[b"id"] == message.id.encode()
        client.close()
    finally:
        replica.kill()  # disposable; a replica's graceful shutdown can take seconds
