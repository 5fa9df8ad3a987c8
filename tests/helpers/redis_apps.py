"""Apps that ``minismtp consume`` runs in the Redis tests (imported by a subprocess).

``recorder`` writes each message it is given to ``$MINISMTP_TEST_OUT/<id>.<pid>`` and appends
``<pid> <id>`` to ``$MINISMTP_TEST_OUT/handled.log`` (one short ``O_APPEND`` write per message:
lines of several consumers do not mix). With ``MINISMTP_TEST_HANG=1`` it writes
``<id>.started`` and never returns (a consumer to kill mid-message); with
``MINISMTP_TEST_HOLD=FILE`` it writes ``<id>.started`` and returns once FILE exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from minismtp import App, Message

recorder = App(hostname="consumer.test")


@recorder.on_message
async def record(message: Message) -> None:
    out = Path(os.environ["MINISMTP_TEST_OUT"])
    if os.environ.get("MINISMTP_TEST_HANG") or os.environ.get("MINISMTP_TEST_HOLD"):
        (out / f"{message.id}.started").write_text(str(os.getpid()))
        if os.environ.get("MINISMTP_TEST_HANG"):
            await anyio.sleep_forever()
        hold = Path(os.environ["MINISMTP_TEST_HOLD"])
        # Another process (the test) creates the file: there is no event to wait on.
        while not hold.exists():  # noqa: ASYNC110, ASYNC240
            await anyio.sleep(0.01)
    (out / f"{message.id}.{os.getpid()}").write_bytes(message.data)
    fd = os.open(out / "handled.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{os.getpid()} {message.id}\n".encode())
    finally:
        os.close(fd)


def handled(out: Path) -> list[tuple[int, str]]:
    """``(pid, message id)`` for each message the recorders handled, in order."""
    try:
        text = (out / "handled.log").read_text()
    except FileNotFoundError:
        return []
    return [(int(pid), mid) for pid, mid in (line.split() for line in text.splitlines())]
