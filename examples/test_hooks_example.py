"""Testing a hook with the in-memory TestClient.

Run it with ``python -m pytest examples/test_hooks_example.py``; the project's own
``python -m pytest`` collects tests/ only, and tests/test_examples.py runs this file.
"""

import pytest

from examples.hello import app
from minismtp.testing import TestClient


@pytest.mark.anyio
async def test_foreign_domain_is_refused():
    async with TestClient(app) as client:
        await client.ehlo("test.example.org")
        await client.mail("a@example.org")
        reply = await client.rcpt("b@elsewhere.org")
        assert reply.code == 550
