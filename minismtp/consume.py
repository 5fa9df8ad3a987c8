"""``minismtp consume URL APP``: an App's ``on_message`` hooks over a Redis stream.

The consumer side of :class:`~minismtp.stores.redis.RedisStreamStore`: any number of
``minismtp consume`` processes, on any machines, share the stream's entries through one
consumer group (Redis Streams' ``XREADGROUP``), each entry handled by one of them:

- each entry becomes the same :class:`~minismtp.message.Message` the in-process channel gives
  (body API included; a body stored in a key is copied into a spool file first), and the
  App's ``on_message`` hooks are called with it, in order; it is closed when they return;
- when they return, the entry is acknowledged (``XACK``), removed from the stream (``XDEL``,
  unless ``--keep-entries``) and its body key deleted, in one ``MULTI``;
- a hook that raises leaves the entry pending: it is delivered again once it has been idle
  for ``--claim-after`` seconds (``XAUTOCLAIM``), by whichever consumer claims it first, as is
  every entry of a consumer that died. While the hooks run, the consumer keeps its entry's
  idle time at zero (``XCLAIM ... JUSTID``), so a slow hook is not mistaken for a dead one;
- an entry delivered more than ``--max-deliveries`` times goes to the dead-letter stream
  (``<stream>:dead`` by default) with the reason, and leaves the group's pending list.

Delivery is at least once: a consumer that dies after its hooks but before its ``XACK`` has
the message handled again elsewhere. Hooks that must not repeat an effect key it on
``message.id`` (unique per accepted message). SIGTERM or SIGINT: the message in hand is
finished and acknowledged, then the process exits 0; a second signal exits at once (the
message in hand is then delivered again later).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
from anyio.abc import TaskStatus

from minismtp.app import App
from minismtp.message import Message
from minismtp.spool import Spool
from minismtp.stores.redis import (
    DEFAULT_STREAM,
    MIB,
    Arg,
    Entry,
    Link,
    RedisURL,
    _import_redis,
    _reason,
    connect,
    redacted,
)

logger = logging.getLogger("minismtp.consume")

DEFAULT_GROUP = "minismtp"


def build_message(entry: Entry, body: bytes | Spool) -> Message:
    """The Message of ``entry`` over ``body`` (the whole message, our trace header first):
    bytes held in memory, or a spool."""
    envelope = entry.envelope()
    size = envelope.pop("size")
    if isinstance(body, bytes):
        return Message.from_bytes(body, trace_length=max(0, len(body) - size), **envelope)
    return Message(spool=body, trace_length=max(0, body.size - size), **envelope)


async def call_hooks(app: App, message: Message) -> None:
    """The App's ``on_message`` hooks with ``message``, in order; the first exception is raised
    and the hooks after it are not called."""
    for hook in app.message_hooks:
        result = hook(message)
        if inspect.isawaitable(result):
            await result


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
    _down_since: float | None = attrs.field(default=None, init=False)

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
        redis = _import_redis()
        try:
            await link.call("PING")
            try:
                await link.call("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM")
            except redis.ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise
        except redis.RedisError as exc:
            await link.aclose()
            where = RedisURL.parse(self.url).where
            raise OSError(f"cannot use Redis at {where}: {_reason(exc)}") from exc
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
        redis = _import_redis()
        next_claim = 0.0
        delay = 0.05
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
                    self._failed(exc)
                    await self._pause(delay)
                    delay = min(self.backoff_max, delay * 2)
                    continue
                delay = 0.05
                if self._down_since is not None:
                    logger.warning(
                        "Redis at %s works again after %.1f s",
                        RedisURL.parse(self.url).where,
                        time.monotonic() - self._down_since,
                    )
                    self._down_since = None
        finally:
            await self.close()

    def _failed(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.error(
                "Redis at %s failed: %s; trying again", RedisURL.parse(self.url).where, _reason(exc)
            )

    async def _pause(self, seconds: float) -> None:
        assert self._link is not None
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
            try:
                await self._link.reset()
            except Exception:
                pass
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


# -- the command ------------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    """``minismtp consume``'s options, on the CLI's subcommands."""
    from minismtp import cli

    consume = commands.add_parser(
        "consume",
        help="run an App's on_message hooks over a Redis stream",
        description=(
            "Read the messages minismtp run --store redis://... stored, with a consumer group, "
            "and call the App's on_message hooks with each; acknowledge it when they return. "
            "SIGTERM or SIGINT finishes the message in hand, then exits 0."
        ),
    )
    consume.add_argument(
        "url",
        metavar="URL",
        help="redis://host:port/db?stream=NAME&group=NAME (defaults: stream minismtp, "
        "group minismtp); also rediss:// and unix://",
    )
    consume.add_argument("app", metavar="APP", help="the App, as module:attribute")
    consume.add_argument(
        "--factory", action="store_true", help="APP names a function that returns the App"
    )
    consume.add_argument(
        "--consumer",
        metavar="NAME",
        help="this consumer's name in the group (default: HOSTNAME-PID)",
    )
    consume.add_argument(
        "--claim-after",
        type=cli._seconds,
        default=60.0,
        metavar="SECONDS",
        help="take over entries pending this long with another consumer, or after a failed "
        "hook (default: %(default)g)",
    )
    consume.add_argument(
        "--max-deliveries",
        type=cli._positive_int,
        default=5,
        metavar="N",
        help="after N deliveries without success, move the entry to the dead-letter stream "
        "(default: %(default)s)",
    )
    consume.add_argument(
        "--dead-letter",
        metavar="STREAM",
        help="the dead-letter stream (default: STREAM:dead)",
    )
    consume.add_argument(
        "--batch",
        type=cli._positive_int,
        default=1,
        metavar="N",
        help="entries read at a time; on SIGTERM the ones not begun are delivered again "
        "after --claim-after (default: %(default)s)",
    )
    consume.add_argument(
        "--keep-entries",
        action="store_true",
        help="leave acknowledged entries (and their body keys) in the stream, for other "
        "groups; trim it yourself (default: delete them)",
    )
    consume.add_argument(
        "--spool-dir",
        type=Path,
        metavar="DIR",
        help="where a body kept in a Redis key is copied for the hooks (default: the system's "
        "temporary directory)",
    )
    consume.add_argument("--loop", choices=cli.LOOPS, default="auto", help="event loop")
    consume.add_argument(
        "--log-level", choices=cli.LOG_LEVELS, default="info", help="(default: %(default)s)"
    )


def main(args: argparse.Namespace) -> int:
    """``minismtp consume``: problems found before consuming are one line and exit status 2."""
    from minismtp import cli

    try:
        backend, backend_options, loop_name = cli.choose_loop(args.loop)
        app = cli.import_app(args.app, factory=args.factory)
        if not isinstance(app, App):
            raise cli.UsageError(f"{args.app} is not a minismtp App")
        try:
            consumer = Consumer.from_url(
                app,
                args.url,
                name=args.consumer,
                claim_after=args.claim_after,
                max_deliveries=args.max_deliveries,
                dead_letter=args.dead_letter,
                batch=args.batch,
                keep_entries=args.keep_entries,
                spool_dir=args.spool_dir,
            )
        except ValueError as exc:
            raise cli.UsageError(str(exc)) from None
        except ImportError as exc:
            raise cli.UsageError(str(exc)) from None
    except cli.UsageError as exc:
        print(f"minismtp: error: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = anyio.run(
            _consume, consumer, loop_name, backend=backend, backend_options=backend_options
        )
    except KeyboardInterrupt:
        return 130
    return result


async def _consume(consumer: Consumer, loop_name: str) -> int:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            await consumer.open()
        except OSError as exc:
            print(f"minismtp: error: {exc}", file=sys.stderr)
            return 2
        async with consumer.app.serving():
            where = RedisURL.parse(consumer.url).where
            print(
                f"minismtp consuming stream {consumer.stream!r} at {where} as "
                f"{consumer.name!r} of group {consumer.group!r} ({loop_name})",
                flush=True,
            )
            aborted = False
            async with anyio.create_task_group() as tasks:

                async def watch() -> None:
                    nonlocal aborted
                    async for signum in signals:
                        if not consumer._stopping:
                            logger.info(
                                "%s: finishing the message in hand", signal.Signals(signum).name
                            )
                            consumer.stop()
                        else:
                            logger.info("%s again: stopping now", signal.Signals(signum).name)
                            aborted = True
                            tasks.cancel_scope.cancel()

                tasks.start_soon(watch)
                await consumer.run()
                tasks.cancel_scope.cancel()
    logger.info(
        "consumer %s stopped: %d handled, %d failed, %d dead-lettered",
        consumer.name,
        consumer.handled,
        consumer.failed,
        consumer.dead,
    )
    return 1 if aborted else 0
