"""``minismtp run --workers N``: one listening socket, N worker processes serving it.

The parent binds the listening socket(s) and starts each worker as a fresh
``python -m minismtp run`` with the same arguments, handing it the socket's file descriptor
(fork and exec: no event loop of the parent's is inherited, so asyncio, uvloop and trio all
work in the workers). Every worker imports the App itself and runs its own ``on_message``
consumers; the kernel shares out the incoming connections among the workers that accept.

The parent restarts a worker that dies, after a pause that doubles with each death in a row
(0.5 s, 1 s, 2 s... up to 30 s; a worker that served for 10 s starts the count again). A worker
that fails to start (it reports on a pipe whether it got to serving, or the one line saying why
not) is tried five times in a row, then the parent stops the others and exits 2 with that line.
It forwards SIGTERM and SIGINT (a graceful stop; a second one closes every session at once, as
with one process) and SIGHUP (reload the certificate), and exits 0 once every worker has stopped
with status 0. The workers run in their own session, so a Ctrl-C at the terminal reaches them
once, through the parent; and each watches its stdin, a pipe from the parent, to stop
gracefully if the parent is gone.

The parent binds every listening socket, each worker's metrics endpoint too, and prints what
listens where; a worker announces nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

import anyio
import attrs
from anyio.abc import Process

log = logging.getLogger("minismtp.workers")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BACKOFF_FIRST = 0.5  # seconds before the first restart of a worker that died
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that served this long before dying starts the backoff over
START_ATTEMPTS = 5  # a worker that failed to start this many times in a row: give up
READY = b"ready\n"  # what a worker writes on its status pipe once it serves


def bind_sockets(host: str | None, port: int, backlog: int = 65536) -> list[socket.socket]:
    """Listening TCP sockets for ``host``:``port``, one per address ``host`` resolves to.

    With port 0 the first socket picks a free port and the others take the same one, as
    anyio's listener does.
    """
    infos = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)  # the kernel caps it at net.core.somaxconn
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@attrs.define(eq=False)
class Supervisor:
    """Keeps ``workers`` processes running ``command + ["--worker-index", i]``."""

    command: Sequence[str]
    workers: int
    pass_fds: Sequence[int]
    #: Set when a worker could not be started: the line saying why (the exit status is then 2).
    failure: str | None = None
    _processes: dict[int, Process] = attrs.field(factory=dict)
    _exit_codes: dict[int, int] = attrs.field(factory=dict)
    _stopping: bool = False
    _stopped: anyio.Event = attrs.field(factory=anyio.Event)

    async def run(self) -> int:
        """Serve until a stop signal and every worker has stopped; the exit status."""
        wanted = [*STOP_SIGNALS, signal.SIGHUP]
        with anyio.open_signal_receiver(*wanted) as signals:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._forward_signals, signals)
                async with anyio.create_task_group() as workers:
                    for index in range(self.workers):
                        workers.start_soon(self._keep_running, index)
                outer.cancel_scope.cancel()
        if self.failure is not None:
            return 2
        failed = {i: code for i, code in self._exit_codes.items() if code != 0}
        if failed:
            log.error("worker(s) stopped with a non-zero status: %s", failed)
            return 1
        return 0

    def _stop(self, signum: signal.Signals = signal.SIGTERM) -> None:
        self._stopping = True
        self._stopped.set()
        for process in list(self._processes.values()):
            if process.returncode is None:
                process.send_signal(signum)

    async def _forward_signals(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum in STOP_SIGNALS:
                log.info("%s: stopping %d worker(s)", name, len(self._processes))
                self._stop(signum)
                continue
            for process in list(self._processes.values()):
                if process.returncode is None:
                    process.send_signal(signum)

    async def _keep_running(self, index: int) -> None:
        deaths = 0  # in a row, each soon after its start
        start_failures = 0  # in a row
        while not self._stopping:
            started = anyio.current_time()
            pid, code, status = await self._run_once(index)
            if self._stopping:
                # Killed by the stop signal itself: it came before the worker had its signal
                # handlers, which it sets before it listens, so it had served no one.
                self._exit_codes[index] = 0 if -code in STOP_SIGNALS else code
                return
            if READY in status:
                start_failures = 0
                what = f"(pid {pid}) exited with status {code}"
            else:
                start_failures += 1
                why = status.decode("utf-8", "replace").strip()
                what = f"could not start: {why or f'pid {pid} exited with status {code}'}"
                if start_failures >= START_ATTEMPTS:
                    self.failure = f"worker {index} {what} ({start_failures} times in a row)"
                    log.error("worker %d %s; giving up, stopping every worker", index, what)
                    self._exit_codes[index] = code
                    self._stop()
                    return
            deaths = deaths + 1 if anyio.current_time() - started < STABLE_AFTER else 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (deaths - 1))
            log.warning("worker %d %s; restarting it in %g s", index, what, delay)
            with anyio.move_on_after(delay):  # not a crash loop at full speed
                await self._stopped.wait()

    async def _run_once(self, index: int) -> tuple[int, int, bytes]:
        """Start worker ``index``, wait for it to end: its pid, its exit status and what it
        reported."""
        status_read, status_write = os.pipe()
        try:
            try:
                process = await anyio.open_process(
                    [*self.command, "--worker-index", str(index), "--status-fd", str(status_write)],
                    stdin=subprocess.PIPE,  # its end closes with us: the worker's cue to stop
                    stdout=None,
                    stderr=None,
                    pass_fds=[*self.pass_fds, status_write],
                    start_new_session=True,
                )
            finally:
                os.close(status_write)
            self._processes[index] = process
            log.info("worker %d started (pid %d)", index, process.pid)
            if self._stopping:  # the signal came while it was starting
                process.send_signal(signal.SIGTERM)
            try:
                code = await process.wait()
            finally:
                del self._processes[index]
            # A few short lines: they wait in the pipe's buffer until the worker has exited.
            os.set_blocking(status_read, False)
            try:
                status = os.read(status_read, 65536)
            except BlockingIOError:
                status = b""
            return process.pid, code, status
        finally:
            os.close(status_read)


def report_status(fd: int | None, text: bytes) -> None:
    """In a worker: tell the parent, on the pipe of ``--status-fd``, ``READY`` or the line
    saying why it could not start."""
    if fd is None:
        return
    try:
        os.write(fd, text)
    except OSError:
        pass  # the parent is gone: nobody to tell


def worker_command(
    argv: Sequence[str],
    plain: Sequence[int],
    tls: Sequence[int],
    metrics: Sequence[Sequence[int]] = (),
) -> list[str]:
    """The command line of a worker: ours, with the inherited sockets named (``metrics[i]``:
    the metrics endpoint's sockets of worker i)."""
    command = [sys.executable, "-m", "minismtp", *argv]
    for fd in plain:
        command += ["--listen-fd", str(fd)]
    for fd in tls:
        command += ["--listen-tls-fd", str(fd)]
    for index, fds in enumerate(metrics):
        for fd in fds:
            command += ["--listen-metrics-fd", f"{index}:{fd}"]
    return command


async def watch_parent(*, task_status: anyio.abc.TaskStatus[None]) -> None:
    """In a worker: SIGTERM ourselves, a graceful stop, once the parent's pipe closes."""
    task_status.started()
    await anyio.wait_readable(sys.stdin.fileno())
    if not os.read(sys.stdin.fileno(), 1):
        log.warning("the parent process is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)
