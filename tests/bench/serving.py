"""What the benchmark's own asyncio servers share (aiosmtpd's, the bare sink): listen, say
so in the line ``run.py`` waits for, and serve until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable


async def serve_until_stopped(
    factory: Callable[[], asyncio.BaseProtocol], host: str, port: int, name: str, loop_name: str
) -> None:
    """Serve ``factory``'s protocol on ``host:port``; return once the server is closed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host=host, port=port, backlog=4096)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"{name} listening on {bound_host}:{bound_port} ({loop_name})", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
