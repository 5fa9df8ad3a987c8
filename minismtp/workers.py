"""``minismtp run --workers N``: one listening socket, N worker processes serving it.

The parent binds the listening socket(s) and starts each worker as a fresh
``python -m minismtp run`` with the same arguments, handing it the socket's file descriptor
(fork and exec: no event loop of the parent's is inherited, so asyncio, uvloop and trio all
work in the workers). Every worker imports the App itself and runs its own ``on_message``
consumers; the kernel shares out the incoming connections among the workers that accept.

The parent restarts a worker that dies, forwards SIGTERM and SIGINT (a graceful stop; a second
one closes every session at once, as with one process) and SIGHUP (reload the certificate),
and exits 0 once every worker has stopped with status 0. The workers run in their own session,
so a Ctrl-C at the terminal reaches them once, through the parent; and each watches its stdin,
a pipe from the parent, to stop gracefully if the parent is gone.
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
RESTART_THROTTLE = 1.0  # a worker that dies within this many seconds waits as long to restart


def bind_sockets(host: str | None, port: int) -> list[socket.socket]:
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
            sock.listen(socket.SOMAXCONN)
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
    _processes: dict[int, Process] = attrs.field(factory=dict)
    _exit_codes: dict[int, int] = attrs.field(factory=dict)
    _stopping: bool = False

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
        failed = {i: code for i, code in self._exit_codes.items() if code != 0}
        if failed:
            log.error("worker(s) stopped with a non-zero status: %s", failed)
            return 1
        return 0

    async def _forward_signals(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum in STOP_SIGNALS:
                log.info("%s: stopping %d worker(s)", name, len(self._processes))
                self._stopping = True
            for process in list(self._processes.values()):
                if process.returncode is None:
                    process.send_signal(signum)

    async def _keep_running(self, index: int) -> None:
        while not self._stopping:
            started = anyio.current_time()
            process = await anyio.open_process(
                [*self.command, "--worker-index", str(index)],
                stdin=subprocess.PIPE,  # its end closes with us: the worker's cue to stop
                stdout=None,
                stderr=None,
                pass_fds=self.pass_fds,
                start_new_session=True,
            )
            self._processes[index] = process
            log.info("worker %d started (pid %d)", index, process.pid)
            if self._stopping:  # the signal came while it was starting
                process.send_signal(signal.SIGTERM)
            try:
                code = await process.wait()
            finally:
                del self._processes[index]
            if self._stopping:
                # Killed by the stop signal itself: it came before the worker had its signal
                # handlers, which it sets before it listens, so it had served no one.
                self._exit_codes[index] = 0 if -code in STOP_SIGNALS else code
                return
            log.warning("worker %d (pid %d) exited with status %d; restarting it", index,
                        process.pid, code)  # fmt: skip
            if anyio.current_time() - started < RESTART_THROTTLE:
                await anyio.sleep(RESTART_THROTTLE)  # not a crash loop at full speed


def worker_command(argv: Sequence[str], plain: Sequence[int], tls: Sequence[int]) -> list[str]:
    """The command line of a worker: ours, with the inherited sockets named."""
    command = [sys.executable, "-m", "minismtp", *argv]
    for fd in plain:
        command += ["--listen-fd", str(fd)]
    for fd in tls:
        command += ["--listen-tls-fd", str(fd)]
    return command


async def watch_parent(*, task_status: anyio.abc.TaskStatus[None]) -> None:
    """In a worker: SIGTERM ourselves, a graceful stop, once the parent's pipe closes."""
    task_status.started()
    await anyio.wait_readable(sys.stdin.fileno())
    if not os.read(sys.stdin.fileno(), 1):
        log.warning("the parent process is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)
