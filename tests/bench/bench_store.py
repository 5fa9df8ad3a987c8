"""The Maildir store alone: ``Maildir.put()`` of 1 KB messages from many tasks at once, with
no SMTP in the way, beside the raw disk rate (``disk.py``) in the same directory.

    python -m tests.bench.bench_store [--dir DIR] [--loop uvloop|asyncio|trio]
        [--tasks 50] [--messages 5000] [--rounds 3] [--no-disk]

Each round measures the store (a fresh Maildir, ``--messages`` puts from ``--tasks`` tasks,
each waiting for its put as an SMTP session waits for its 250), then ``disk.py``'s ``group``
mode for as many seconds as the store took. It prints per round: msgs/s and the CPU per
message (user and system, this process's), the raw files/s and the ratio; then the medians.
Nothing is removed before the end (see disk.py on why). Pin it with ``taskset -c 0`` to
compare with ``run.py``'s pinned servers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread

from minismtp.message import Message
from minismtp.stores.maildir import Maildir
from tests.bench.client import message_content

ROOT = Path(__file__).resolve().parents[2]


async def put_all(box: Maildir, data: bytes, tasks: int, messages: int, threads: int) -> None:
    if threads:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
    await box.open()
    left = [messages]

    async def session() -> None:
        while left[0] > 0:
            left[0] -= 1
            await box.put(Message.from_bytes(data))

    async with anyio.create_task_group() as group:
        for _ in range(tasks):
            group.start_soon(session)


def measure_store(
    root: Path, loop: str, tasks: int, messages: int, threads: int = 0
) -> dict[str, float]:
    data = message_content(1024)
    box = Maildir(root)
    backend = "trio" if loop == "trio" else "asyncio"
    options = {"use_uvloop": loop == "uvloop"} if backend == "asyncio" else {}
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    anyio.run(
        put_all, box, data, tasks, messages, threads, backend=backend, backend_options=options
    )
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    stored = len(os.listdir(root / "new"))
    assert stored == messages, (stored, messages)
    return {
        "msgs_per_s": messages / seconds,
        "seconds": seconds,
        "user_us": (after.ru_utime - before.ru_utime) / messages * 1e6,
        "sys_us": (after.ru_stime - before.ru_stime) / messages * 1e6,
        "directory_syncs": box.directory_syncs,
    }


def measure_disk(directory: Path, seconds: float) -> float:
    argv = [sys.executable, "-m", "tests.bench.disk", "--dir", str(directory), "--keep"]
    argv += ["--modes", "group", "--seconds", f"{seconds:.1f}"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
    rate: float = json.loads(done.stdout.decode().strip().splitlines()[-1])["group"]
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--loop", choices=["uvloop", "asyncio", "trio"], default="uvloop")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="anyio's worker threads (default: its 40)"
    )
    parser.add_argument("--no-disk", action="store_true", help="the store alone")
    parser.add_argument("--keep", action="store_true", help="leave the files (see disk.py)")
    args = parser.parse_args(argv)
    top = Path(tempfile.mkdtemp(prefix="minismtp-store-", dir=args.dir))
    rows = []
    try:
        for n in range(1, args.rounds + 1):
            row = measure_store(
                top / f"maildir-{n}", args.loop, args.tasks, args.messages, args.threads
            )
            if not args.no_disk:
                row["disk"] = measure_disk(top, max(2.0, row["seconds"]))
                row["of_disk"] = row["msgs_per_s"] / row["disk"]
            rows.append(row)
            print(
                f"round {n}: {row['msgs_per_s']:7,.0f} msgs/s, CPU/msg user "
                f"{row['user_us']:4.0f} µs + sys {row['sys_us']:4.0f} µs, "
                f"{row['directory_syncs']} fsyncs of new/"
                + (
                    f"; raw disk {row['disk']:6,.0f} files/s, ratio {row['of_disk']:.0%}"
                    if "disk" in row
                    else ""
                ),
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
