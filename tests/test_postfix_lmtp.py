"""Interoperability: Postfix's LMTP client delivers into ``minismtp run --lmtp --unix``.

A private Postfix instance (tests/helpers/postfix.py: its own configuration, queue and log,
started and stopped here) gets a message for two addresses of the list domain and hands it to
``examples.lmtp_lists`` over LMTP on a unix socket. The list server takes it for one list and
refuses the other after the data; Postfix's log shows what that means to an MTA: one
``status=sent`` and one ``status=bounced`` (RFC 2033 4.2), for the same message.

Skipped, with the reason, where Postfix is not installed, unless ``CI`` is set: CI installs it
(``.ci/run``), and there a missing Postfix is a failure.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers.postfix import private_directory, running_postfix, unavailable
from tests.helpers.processes import need
from tests.helpers.processes import run_on_unix_socket as run

BODY = b"From: someone@example.org\r\nSubject: interop\r\n\r\nTo two lists.\r\n"


@pytest.fixture
def postfix_usable() -> None:
    reason = unavailable()
    if reason is not None:
        need("a Postfix instance", reason)


@pytest.mark.slow
@pytest.mark.usefixtures("postfix_usable")
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_postfix_delivers_over_lmtp_one_recipient_sent_one_bounced(loop: str) -> None:
    with private_directory() as directory:
        sock = directory / "lmtp.sock"
        args = ("--lmtp", "--unix", str(sock), "--unix-mode", "0666", "--loop", loop)
        with run("examples.lmtp_lists:app", *args) as server:
            with running_postfix(directory, "lists.example.com", sock) as postfix:
                postfix.inject(
                    "someone@example.org",
                    ["dev@lists.example.com", "nobody@lists.example.com"],
                    BODY,
                )
                statuses = postfix.statuses(2)
            message = server.wait_for("stdout", r"^list dev: message (\w+) from <someone@")
            assert server.stop() == 0
    sent, sent_text = statuses["dev@lists.example.com"]
    bounced, bounced_text = statuses["nobody@lists.example.com"]
    assert sent == "sent"
    assert re.search(rf"250 2\.0\.0 OK queued as {message[1]}\b", sent_text)
    assert bounced == "bounced"
    assert "said: 550 5.1.1 No such list (in reply to end of DATA command)" in bounced_text
