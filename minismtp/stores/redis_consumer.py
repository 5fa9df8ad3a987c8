"""The consumer side of :class:`~minismtp.stores.redis.RedisStreamStore`: :class:`Consumer`,
one member of a consumer group calling an App's ``on_message`` hooks for each entry.

What it promises (at-least-once delivery, claims, dead letters) is written in
:mod:`minismtp.consume`, the command that runs it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
from anyio.abc import TaskStatus

from minismtp.app import App
from minismtp.hooks import call_each
from minismtp.message import Message
from minismtp.spool import Spool
from minismtp.stores.redis_entry import Entry, build_message
from minismtp.stores.redis_link import Arg, Link, Outage, connect, import_redis, quietly, reason
from minismtp.stores.redis_url import DEFAULT_STREAM, MIB, RedisURL, redacted

logger = logging.getLogger("minismtp.consume")

DEFAULT_GROUP = "minismtp"


async def call_hooks(app: App, message: Message) -> None:
    """The App's ``on_message`` hooks with ``message``, in order; the first exception is raised
    and the hooks after it are not called."""
    await call_each(app.message_hooks, message)


@attrs.define(eq=False)
class Consumer:
    """One member ``name`` of the consumer group ``group`` on ``stream``, calling ``app``'s
    ``on_message`` hooks for each entry it is given."""

    app: App
    url: str = attrs.field(repr=lambda url: repr(redacted(url)))  # redis-py's form
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    name: str = attrs.field(factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    claim_after: float = 60.0
    max_deliveries: int = 5
    dead_letter: str | None = None  # default: "<stream>:dead"
    batch: int = 1
    keep_entries: bool = False
    block: float = 0.5  # seconds an XREADGROUP waits; also how soon a stop is noticed
    timeout: float = 5.0
    backoff_max: float = 2.0
    spool_dir: Path | None = None
    #: Entries acknowledged, left pending after a failing hook, and dead-lettered.
    handled: int = attrs.field(default=0, init=False)
    failed: int = attrs.field(default=0, init=False)
    dead: int = attrs.field(default=0, init=False)
    _link: Link | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _wake: anyio.Event | None = attrs.field(default=None, init=False)
    _outage: Outage = attrs.field(init=False, factory=lambda: Outage(logger, then="trying again"))

    @classmethod
    def from_url(cls, app: App, url: str, **options: Any) -> Consumer:
        parsed = RedisURL.parse(url)
        for name in ("wait", "wait_timeout", "waitaof", "inline_max"):
            if name in parsed.options:
                raise ValueError(f"Redis URL: {name}= is for a store, not for minismtp consume")
        settings: dict[str, Any] = {
            "stream": parsed.text("stream", DEFAULT_STREAM),
            "group": parsed.text("group", DEFAULT_GROUP),
            "timeout": parsed.seconds("timeout", 5.0),
        }
        if "consumer" in parsed.options:
            settings["name"] = parsed.text("consumer", "")
        settings.update({k: v for k, v in options.items() if v is not None})
        return cls(app, parsed.connect, **settings)

    @property
    def where(self) -> str:
        return RedisURL.parse(self.url).where

    @property
    def dead_letter_stream(self) -> str:
        return self.dead_letter or f"{self.stream}:dead"

    def stop(self) -> None:
        """Finish the message in hand, then return from :meth:`run`."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    async def open(self) -> None:
        """Connect, and create the group (from the stream's first entry) if it is missing."""
        if self._link is not None:
            return
        link = connect(self.url, self.timeout)
        redis = import_redis()
        try:
            await link.call("PING")
            try:
                await link.call("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM")
            except redis.ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise
        except redis.RedisError as exc:
            await link.aclose()
            raise OSError(f"cannot use Redis at {self.where}: {reason(exc)}") from exc
        self._link = link

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
            try:
                # A consumer that leaves nothing pending leaves the group's list of consumers.
                summary = await link.call(
                    "XPENDING", self.stream, self.group, "-", "+", 1, self.name
                )
                if not summary:
                    await link.call("XGROUP", "DELCONSUMER", self.stream, self.group, self.name)
            except Exception:
                pass
            try:
                await link.aclose()
            except Exception:
                pass

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until :meth:`stop`: new entries, and others' idle ones past ``claim_after``."""
        await self.open()
        task_status.started()
        redis = import_redis()
        next_claim = 0.0
        try:
            while not self._stopping:
                try:
                    if time.monotonic() >= next_claim:
                        await self._claim_idle()
                        next_claim = time.monotonic() + max(0.05, self.claim_after / 2)
                    if not self._stopping:
                        # Not past the next look for idle entries: a short claim_after is kept.
                        await self._read_new(min(self.block, next_claim - time.monotonic()))
                except redis.RedisError as exc:
                    await self._pause(self._outage.failed(exc, self.where, 0.05, self.backoff_max))
                    continue
                self._outage.recovered()
        finally:
            await self.close()

    async def _pause(self, seconds: float) -> None:
        await quietly(self.link.reset, self.timeout)
        self._wake = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = None

    @property
    def link(self) -> Link:
        if self._link is None:
            raise RuntimeError("the consumer is not open")
        return self._link

    async def _read_new(self, block: float) -> None:
        reply = await self.link.call(
            "XREADGROUP",
            "GROUP",
            self.group,
            self.name,
            "COUNT",
            self.batch,
            "BLOCK",
            max(1, round(block * 1000)),
            "STREAMS",
            self.stream,
            ">",
        )
        for _, found in reply or ():
            for stream_id, flat in found:
                if self._stopping:
                    return  # read but not begun: delivered again after claim_after
                await self._handle(Entry.from_reply(stream_id, flat))

    async def _claim_idle(self) -> None:
        """Take over entries idle longer than ``claim_after`` (a dead consumer's, or ones whose
        hooks failed), and hand on those delivered too often to the dead-letter stream."""
        cursor: bytes = b"0-0"
        min_idle = max(1, round(self.claim_after * 1000))
        while not self._stopping:
            reply = await self.link.call(
                "XAUTOCLAIM",
                self.stream,
                self.group,
                self.name,
                min_idle,
                cursor,
                "COUNT",
                self.batch,
            )
            cursor, claimed = reply[0], [item for item in reply[1] if item]
            if claimed:
                deliveries = await self._deliveries(claimed[0][0], claimed[-1][0])
                for stream_id, flat in claimed:
                    entry = Entry.from_reply(stream_id, flat)
                    count = deliveries.get(stream_id, 1)
                    if count > self.max_deliveries:
                        await self._bury(entry, f"delivered {count} times without success")
                    elif not self._stopping:
                        logger.info(
                            "entry %s (message %s) claimed after %g s idle (delivery %d)",
                            entry.stream_id,
                            entry.message_id,
                            self.claim_after,
                            count,
                        )
                        await self._handle(entry)
            if cursor == b"0-0":
                return

    async def _deliveries(self, first: bytes, last: bytes) -> dict[bytes, int]:
        rows = await self.link.call(
            "XPENDING", self.stream, self.group, first, last, self.batch, self.name
        )
        return {row[0]: int(row[3]) for row in rows or ()}

    async def _handle(self, entry: Entry) -> None:
        """One entry: the hooks, then the acknowledgement (or nothing, if a hook raised)."""
        message_id = entry.message_id
        try:
            body = await self._body(entry)
            if body is None:
                await self._bury(entry, "its body key is gone")
                return
            message = build_message(entry, body)
        except ValueError as exc:  # a malformed entry: no later delivery will do better
            await self._bury(entry, str(exc))
            return
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._keep_claimed, entry.stream_id)
                try:
                    await call_hooks(self.app, message)
                except Exception as exc:  # caught here: not wrapped in a group
                    failure = exc
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            message.close()  # the hooks are done with it: its spool file goes
        if failure is not None:
            self.failed += 1
            logger.error(
                "on_message hook failed for message %s (entry %s); it stays pending "
                "and is delivered again after %g s",
                message_id,
                entry.stream_id,
                self.claim_after,
                exc_info=failure,
            )
            return
        await self._acknowledge(entry)
        self.handled += 1
        logger.debug("message %s (entry %s) handled", message_id, entry.stream_id)

    async def _body(self, entry: Entry) -> bytes | Spool | None:
        """The entry's body: its ``body`` field, or its body key read in pieces into a spool
        file (named and locked as the server's are: a consumer killed meanwhile leaves one
        that the next App to start with that spool directory removes)."""
        body = entry.fields.get("body")
        if body is not None:
            return body
        key = entry.body_key
        if key is None:
            raise ValueError(f"entry {entry.stream_id} has neither body nor body_key")
        spool = Spool(self.spool_dir, 0)  # no memory limit to speak of: straight to a file
        try:
            while True:
                piece = await self.link.call("GETRANGE", key, spool.size, spool.size + MIB - 1)
                if piece:
                    await anyio.to_thread.run_sync(spool.write, piece)
                if len(piece) < MIB:
                    break
            if spool.size == 0 and not await self.link.call("EXISTS", key):
                spool.close()
                return None
            await anyio.to_thread.run_sync(spool.finish)
        except BaseException:
            spool.close()
            raise
        return spool

    async def _keep_claimed(self, stream_id: str) -> None:
        """While the hooks run, reset the entry's idle time, so that no other consumer claims
        it as a dead consumer's (JUSTID: the delivery count stays as it is)."""
        interval = max(0.05, self.claim_after / 3)
        while True:
            await anyio.sleep(interval)
            try:
                await self.link.call(
                    "XCLAIM", self.stream, self.group, self.name, 0, stream_id, "JUSTID"
                )
            except Exception as exc:  # the next tick tries again; the hooks go on
                logger.debug("could not refresh entry %s: %s", stream_id, exc)

    async def _acknowledge(self, entry: Entry) -> None:
        commands: list[list[Arg]] = [["MULTI"], ["XACK", self.stream, self.group, entry.stream_id]]
        if not self.keep_entries:
            commands.append(["XDEL", self.stream, entry.stream_id])
            if entry.body_key is not None:
                commands.append(["DEL", entry.body_key])
        commands.append(["EXEC"])
        # Shielded: the hooks are done; a stop must not leave them done but unacknowledged.
        with anyio.CancelScope(shield=True):
            await self.link.batch(commands)

    async def _bury(self, entry: Entry, reason: str) -> None:
        """Move ``entry`` to the dead-letter stream, with why and where it came from."""
        fields: list[Arg] = []
        for name, value in entry.fields.items():
            fields += [name, value]
        fields += [
            "dead_reason",
            reason,
            "dead_stream",
            self.stream,
            "dead_id",
            entry.stream_id,
            "dead_group",
            self.group,
        ]
        commands: list[list[Arg]] = [
            ["MULTI"],
            ["XADD", self.dead_letter_stream, "*", *fields],
            ["XACK", self.stream, self.group, entry.stream_id],
        ]
        if not self.keep_entries:
            commands.append(["XDEL", self.stream, entry.stream_id])
        commands.append(["EXEC"])
        with anyio.CancelScope(shield=True):
            await self.link.batch(commands)
        self.dead += 1
        logger.warning(
            "message %s (entry %s) moved to %s: %s",
            entry.message_id or "?",
            entry.stream_id,
            self.dead_letter_stream,
            reason,
        )
