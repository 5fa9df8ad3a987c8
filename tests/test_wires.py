"""The stream wire: read sizes follow the traffic."""

from __future__ import annotations

import pytest
from anyio.abc import ByteStream

from minismtp.wires import StreamWire

pytestmark = pytest.mark.anyio


class Source(ByteStream):
    """Gives out ``lengths`` octets read by read, recording the size of each request."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.requested: list[int] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        self.requested.append(max_bytes)
        return b"x" * min(self.lengths.pop(0), max_bytes)

    async def send(self, item: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


async def test_reads_grow_while_they_come_back_full_and_shrink_after() -> None:
    """A message streaming in fills every read: the wire then asks for four times as much, and
    goes back to the configured size once a read comes back short (a command, a reply)."""
    source = Source([100, 400, 300, 10, 50])
    wire = StreamWire(source, read_size=100)
    received = [len(await wire.receive()) for _ in range(5)]
    assert received == [100, 400, 300, 10, 50]
    assert source.requested == [100, 400, 400, 400, 100]
