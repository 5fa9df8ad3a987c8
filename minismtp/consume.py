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
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from minismtp.app import App
from minismtp.stores.redis_consumer import DEFAULT_GROUP, Consumer, call_hooks
from minismtp.stores.redis_entry import build_message

__all__ = ["DEFAULT_GROUP", "Consumer", "add_parser", "build_message", "call_hooks", "main"]

logger = logging.getLogger("minismtp.consume")


def add_parser(commands: Any) -> None:
    """``minismtp consume``'s options, on the CLI's subcommands."""
    from minismtp.cli_parser import LOG_LEVELS, LOOPS, _positive_int, _seconds

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
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="take over entries pending this long with another consumer, or after a failed "
        "hook (default: %(default)g)",
    )
    consume.add_argument(
        "--max-deliveries",
        type=_positive_int,
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
        type=_positive_int,
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
    consume.add_argument("--loop", choices=LOOPS, default="auto", help="event loop")
    consume.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="(default: %(default)s)"
    )


def main(args: argparse.Namespace) -> int:
    """``minismtp consume``: problems found before consuming are one line and exit status 2."""
    from minismtp.cli_loading import choose_loop, import_app
    from minismtp.cli_parser import UsageError

    try:
        backend, backend_options, loop_name = choose_loop(args.loop)
        app = import_app(args.app, factory=args.factory)
        if not isinstance(app, App):
            raise UsageError(f"{args.app} is not a minismtp App")
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
            raise UsageError(str(exc)) from None
        except ImportError as exc:
            raise UsageError(str(exc)) from None
    except UsageError as exc:
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
            print(
                f"minismtp consuming stream {consumer.stream!r} at {consumer.where} as "
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
