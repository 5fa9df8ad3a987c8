"""Durable hand-off to Redis Streams: :class:`RedisStreamStore` (``pip install 'minismtp[redis]'``).

Every accepted message becomes one stream entry (``XADD``), which consumers in any language
read with a consumer group (``minismtp consume`` is one such consumer); the entry's fields are
in :mod:`minismtp.stores.redis_entry`, the URL's options in :mod:`minismtp.stores.redis_url`,
the connection on either backend in :mod:`minismtp.stores.redis_link`.

A body over ``inline_max`` is written in pieces from the spool (``SET ... EX``, then
``APPEND``), never joined in memory beyond one piece. The key is born with a time to live
(``body_ttl``); the ``PERSIST`` that removes it and the ``XADD`` that names it run in one
``MULTI``: a body whose entry was never added expires instead of leaking.

What a return from :meth:`RedisStreamStore.put` (and so the ``250``) promises depends on the
server and the options; the README spells it out (``appendfsync always``: the entry is in the
append-only file, fsynced, before Redis answers; ``wait=N``: N replicas have it in memory too;
``waitaof=L,R``: fsynced locally (L=1) and on R replicas).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs

from minismtp import stores
from minismtp.message import Message
from minismtp.stores.redis_entry import Entry, entry_fields
from minismtp.stores.redis_link import (
    Arg,
    Link,
    Outage,
    check,
    connect,
    import_redis,
    quietly,
    reason,
)
from minismtp.stores.redis_url import DEFAULT_STREAM, MIB, SCHEMES, RedisURL, redacted
from minismtp.types import Address, Reply

__all__ = [
    "DEFAULT_STREAM",
    "MIB",
    "SCHEMES",
    "Arg",
    "Entry",
    "Link",
    "RedisStreamStore",
    "RedisURL",
    "StoreUnavailable",
    "check",
    "connect",
    "entry_fields",
    "redacted",
]

logger = logging.getLogger("minismtp.stores.redis")


class StoreUnavailable(stores.StoreUnavailable):
    """Redis did not take the message (unreachable, timing out, read-only, out of memory, too
    few replicas): nothing was acknowledged, the client is answered ``451 4.3.0``."""


async def _pieces(message: Message, size: int) -> AsyncIterator[bytes]:
    """The whole message (trace header first) in pieces of ``size`` octets (the last shorter),
    from the spool: never more than one piece joined in memory."""
    piece = bytearray()
    async for chunk in message.chunks(size):
        if not piece and len(chunk) == size:
            yield bytes(chunk)
            continue
        piece += chunk
        if len(piece) >= size:
            yield bytes(piece[:size])
            del piece[:size]
    if piece:
        yield bytes(piece)


@attrs.define(eq=False)
class _Add:
    """One message's XADD in a group commit, and what became of it (an id, or an error)."""

    command: list[Arg]
    outcome: Any = None
    taken: anyio.Event | None = None  # set when the pipeline that took it is done


@attrs.define(eq=False)
class RedisStreamStore:
    """Each message an entry of the Redis stream ``stream`` before the ``250``.

    ``RedisStreamStore.from_url("redis://host:6379/0?stream=inbound&wait=1")`` reads the
    options from a URL (see :class:`RedisURL`): ``stream``, ``wait`` (replicas that must
    acknowledge: ``WAIT``), ``wait_timeout`` (milliseconds, for ``WAIT`` and ``WAITAOF``),
    ``waitaof`` (``L,R``: ``WAITAOF L R``, Redis 7.2+), ``inline_max`` (largest body put in
    the entry itself, in octets) and ``timeout`` (seconds for a connection or a reply).

    When Redis fails (unreachable, timeout, ``READONLY``, ``OOM``, too few replicas), ``put``
    raises :class:`StoreUnavailable` and the client gets ``451 4.3.0``. For a moment after a
    failure (``backoff``, doubled up to ``backoff_max`` while failures go on) messages are
    refused at once, without waiting for Redis; then the next message tries again. One log
    line when Redis fails, one when it is back: not one per message.
    """

    url: str = attrs.field(repr=lambda url: repr(redacted(url)))
    stream: str = DEFAULT_STREAM
    wait_replicas: int = 0
    wait_timeout: float = 1.0  # seconds
    waitaof_local: int = 0
    waitaof_replicas: int = 0
    inline_max: int = MIB
    piece_size: int = MIB
    body_ttl: int = 3600  # seconds a body key lives until the XADD that names it persists it
    timeout: float = 5.0
    backoff: float = 0.1
    backoff_max: float = 2.0
    max_in_flight: int = 4  # XADD pipelines on their way at once (see _commit)
    #: Stores that write files want the spool there; a Redis store takes the body from anywhere.
    spool_dir: Path | None = None
    _link: Link | None = attrs.field(default=None, init=False)
    _outage: Outage = attrs.field(
        init=False,
        factory=lambda: Outage(
            logger,
            then="answering 451 until it works again",
            counted="message(s) were answered 451",
        ),
    )
    _queue: list[_Add] = attrs.field(factory=list, init=False)  # XADDs waiting for a batch
    _in_flight: int = attrs.field(default=0, init=False)  # pipelines on their way
    _slot_free: anyio.Event | None = attrs.field(default=None, init=False)

    @classmethod
    def from_url(cls, url: str) -> RedisStreamStore:
        """The store a ``--store`` URL describes (ValueError with the reason if it is bad)."""
        parsed = RedisURL.parse(url)
        for name in ("group", "consumer"):
            if name in parsed.options:
                raise ValueError(f"Redis URL: {name}= is for minismtp consume, not for a store")
        waitaof = parsed.options.get("waitaof")
        local = replicas = 0
        if waitaof is not None:
            local_text, _, replicas_text = waitaof.partition(",")
            if not (local_text in ("0", "1") and replicas_text.isdigit()):
                raise ValueError(
                    f"Redis URL: waitaof={waitaof!r} must be L,R (L 0 or 1, R replicas)"
                )
            local, replicas = int(local_text), int(replicas_text)
        return cls(
            parsed.connect,
            stream=parsed.text("stream", DEFAULT_STREAM),
            wait_replicas=parsed.integer("wait", 0),
            wait_timeout=parsed.integer("wait_timeout", 1000, minimum=1) / 1000,
            waitaof_local=local,
            waitaof_replicas=replicas,
            inline_max=parsed.integer("inline_max", MIB),
            timeout=parsed.seconds("timeout", 5.0),
        )

    @property
    def where(self) -> str:
        return RedisURL.parse(self.url).where

    def describe(self) -> str:
        """What a 250 promises with these settings, for the startup log line."""
        extra = ""
        if self.wait_replicas:
            extra += f", WAIT {self.wait_replicas}"
        if self.waitaof_local or self.waitaof_replicas:
            extra += f", WAITAOF {self.waitaof_local} {self.waitaof_replicas}"
        return f"redis stream {self.stream!r} at {self.where}{extra}"

    async def open(self) -> None:
        """Connect and check: PING, the stream's type, WAITAOF support if it is asked for.
        Raises OSError with one line of text."""
        if self._link is not None:
            return
        try:
            link = connect(self.url, self.timeout)
        except (ValueError, TypeError) as exc:
            raise OSError(f"Redis URL {redacted(self.url)!r}: {exc}") from None
        redis = import_redis()
        try:
            await link.call("PING")
            kind = await link.call("TYPE", self.stream)
            if kind not in (b"stream", b"none"):
                raise OSError(
                    f"Redis key {self.stream!r} at {self.where} is a {kind.decode()}, not a stream"
                )
            if self.waitaof_local or self.waitaof_replicas:
                info = await link.call("INFO", "server")
                version = _info_field(info, "redis_version")
                if _version(version) < (7, 2):
                    raise OSError(f"waitaof= needs Redis 7.2 or later; {self.where} runs {version}")
            if self.wait_replicas or self.waitaof_replicas:
                info = await link.call("INFO", "replication")
                connected = int(_info_field(info, "connected_slaves") or 0)
                wanted = max(self.wait_replicas, self.waitaof_replicas)
                if connected < wanted:
                    logger.warning(
                        "Redis at %s has %d replica(s) connected; every message will wait for %d"
                        " and be refused (451) until they are",
                        self.where,
                        connected,
                        wanted,
                    )
        except redis.RedisError as exc:
            await quietly(link.aclose, 5)
            raise OSError(f"cannot reach Redis at {self.where}: {reason(exc)}") from exc
        except BaseException:
            await quietly(link.aclose, 5)
            raise
        self._link = link
        logger.info("storing messages in %s", self.describe())

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await quietly(link.aclose, 5)

    async def __aenter__(self) -> RedisStreamStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def put(self, message: Message) -> Mapping[Address, Reply] | None:
        """Add ``message`` to the stream; return once Redis has it as durably as configured."""
        link = self._link
        if link is None:
            raise RuntimeError("RedisStreamStore.put() before open()")
        if self._outage.waiting():
            raise StoreUnavailable(f"Redis at {self.where} unavailable: {self._outage.reason}")
        redis = import_redis()
        try:
            await self._add(link, message)
        except (redis.RedisError, StoreUnavailable) as exc:
            await self._failed(link, exc)
            raise StoreUnavailable(
                f"Redis at {self.where} did not take message {message.id}: {reason(exc)}"
            ) from exc
        self._outage.recovered()
        return None

    async def _add(self, link: Link, message: Message) -> None:
        fields = entry_fields(message)
        if message.size <= self.inline_max:
            xadd: list[Arg] = ["XADD", self.stream, "*", *fields, "body", message.data]
            await self._commit(link, _Add(xadd))
            return
        key = f"{self.stream}:body:{message.id}"
        refused = True  # until the MULTI is sent: no entry names the key, it may go
        try:
            first = True
            async for piece in _pieces(message, self.piece_size):
                if first:
                    await link.call("SET", key, piece, "EX", self.body_ttl)
                    first = False
                else:
                    await link.call("APPEND", key, piece)
            xadd = ["XADD", self.stream, "*", *fields, "body_key", key]
            refused = False  # a lost reply leaves it unknown: PERSIST and XADD, or the TTL
            try:
                replies = await link.batch(
                    [["MULTI"], ["PERSIST", key], xadd, ["EXEC"], *self._durability()]
                )
            except import_redis().ResponseError:
                refused = True  # a command refused while queued (OOM...): EXEC aborted
                raise
            executed = replies[3]
            if executed is None or any(isinstance(reply, Exception) for reply in executed):
                refused = True
                errors = [reply for reply in executed or () if isinstance(reply, Exception)]
                raise errors[0] if errors else StoreUnavailable("the transaction was aborted")
            self._check_durability(replies, 4)  # the entry stays: at-least-once
        except BaseException:
            if refused:
                # Sooner than its time to live: nothing names the key.
                await quietly(functools.partial(link.call, "DEL", key), self.timeout)
            raise

    async def _commit(self, link: Link, add: _Add) -> None:
        """Group commit: up to ``max_in_flight`` pipelines on their way at once; a message that
        finds them all busy waits, and the next free one takes every message waiting (one
        pipeline, one WAIT/WAITAOF for all). Under light load each message goes alone, at
        once; under heavy load the client's cost per message falls."""
        self._queue.append(add)
        try:
            while add.taken is None:
                if self._in_flight < self.max_in_flight:
                    batch, self._queue = self._queue, []
                    done = anyio.Event()
                    for queued in batch:
                        queued.taken = done
                    self._in_flight += 1
                    try:
                        await self._flush(link, batch)
                    finally:
                        self._in_flight -= 1
                        done.set()
                        if self._slot_free is not None:
                            self._slot_free.set()
                            self._slot_free = None
                    break
                if self._slot_free is None:
                    self._slot_free = anyio.Event()
                await self._slot_free.wait()
            else:
                await add.taken.wait()
        except BaseException:
            if add in self._queue:  # cancelled before a pipeline took it: none will
                self._queue.remove(add)
            raise
        if isinstance(add.outcome, BaseException):
            raise add.outcome

    async def _flush(self, link: Link, batch: list[_Add]) -> None:
        durability = self._durability()
        try:
            if len(batch) == 1 and not durability:
                replies: list[Any] = [await link.call(*batch[0].command)]
            else:
                commands = [add.command for add in batch] + durability
                replies = await link.batch(commands, raise_on_error=False)
                self._check_durability(replies, len(batch))
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else StoreUnavailable("cancelled")
            for add in batch:
                add.outcome = failure
            raise
        for add, reply in zip(batch, replies, strict=False):
            add.outcome = reply

    def _durability(self) -> list[list[Arg]]:
        timeout_ms = max(1, round(self.wait_timeout * 1000))
        commands: list[list[Arg]] = []
        if self.wait_replicas:
            commands.append(["WAIT", self.wait_replicas, timeout_ms])
        if self.waitaof_local or self.waitaof_replicas:
            commands.append(["WAITAOF", self.waitaof_local, self.waitaof_replicas, timeout_ms])
        return commands

    def _check_durability(self, replies: list[Any], first: int) -> None:
        index = first
        for reply in replies[first:]:
            if isinstance(reply, Exception):
                raise reply
        if self.wait_replicas:
            acknowledged = int(replies[index])
            if acknowledged < self.wait_replicas:
                raise StoreUnavailable(
                    f"WAIT: {acknowledged} of {self.wait_replicas} replica(s) acknowledged"
                )
            index += 1
        if self.waitaof_local or self.waitaof_replicas:
            local, replicas = (int(n) for n in replies[index])
            if local < self.waitaof_local or replicas < self.waitaof_replicas:
                raise StoreUnavailable(
                    f"WAITAOF: fsynced locally {local}/{self.waitaof_local}, "
                    f"on {replicas}/{self.waitaof_replicas} replica(s)"
                )

    async def _failed(self, link: Link, exc: BaseException) -> None:
        self._outage.failed(exc, self.where, self.backoff, self.backoff_max)
        redis = import_redis()
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            # The idle connections may be as dead as this one: the next try opens new ones.
            await quietly(link.reset, self.timeout)


def _info_field(info: bytes, name: str) -> str:
    for line in info.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def _version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)
