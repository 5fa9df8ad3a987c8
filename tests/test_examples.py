"""Every example in examples/ runs, through real SMTP dialogues.

- hello and custom_middleware: served on port 0 on each anyio backend, driven by smtplib;
- mx: served as its docstring says, ``minismtp run examples.mx:app`` in a subprocess;
- test_hooks_example: run by pytest, as a user runs it.

The ``minismtp run`` subprocess is :func:`tests.helpers.processes.run`.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from minismtp import App
from minismtp.server import ServerConfig, serve
from minismtp.testing import TestClient
from tests.helpers.processes import ROOT, project_env, run

BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello, example.com.\r\n"
HOOKS_EXAMPLE = "examples/test_hooks_example.py"


def test_every_example_is_run_here() -> None:
    """A new example needs a test in this file: this list is what the tests below cover."""
    covered = {
        "__init__.py", "hello.py", "custom_middleware.py", "mx.py", "lmtp_lists.py",
        HOOKS_EXAMPLE,
    }  # fmt: skip
    present = {path.name for path in (ROOT / "examples").glob("*.py")}
    assert present == {Path(name).name for name in covered}


# -- hello and custom_middleware over a real socket --------------------------------------------


async def sendmail(
    app: App, sender: str, recipients: list[str]
) -> tuple[dict[str, tuple[int, bytes]], bool]:
    """smtplib's sendmail against ``app`` served on port 0: the recipients it refused, and
    whether the message went through (smtplib raises SMTPRecipientsRefused when none did)."""
    config = ServerConfig(shutdown_grace=1.0)
    async with serve(app, "127.0.0.1", 0, config=config) as server:

        def send() -> tuple[dict[str, tuple[int, bytes]], bool]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                try:
                    return client.sendmail(sender, recipients, BODY), True
                except smtplib.SMTPRecipientsRefused as refused:
                    return refused.recipients, False

        return await anyio.to_thread.run_sync(send)


@pytest.mark.anyio
async def test_hello_accepts_example_com_refuses_others_rfc5321_3_3(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from examples.hello import app

    refused = await sendmail(app, "a@example.org", ["b@example.com", "c@elsewhere.org"])
    assert refused == ({"c@elsewhere.org": (550, b"5.7.1 Relay access denied")}, True)
    # on_message printed the message once the server had stopped (the channel is drained).
    (line,) = capsys.readouterr().out.splitlines()
    message_id, sender, *_ = line.split()
    assert sender == "a@example.org" and re.fullmatch(r"[0-9A-Z]+", message_id)


@pytest.mark.anyio
async def test_hello_refusing_every_recipient_reaches_smtplib_rfc5321_4_2_2() -> None:
    from examples.hello import app

    refused = await sendmail(app, "a@example.org", ["c@elsewhere.org"])
    assert refused == ({"c@elsewhere.org": (550, b"5.7.1 Relay access denied")}, False)


@pytest.mark.anyio
async def test_custom_middleware_refuses_denied_recipients_before_the_hooks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from examples.custom_middleware import app

    recipients = ["Former-Employee@Example.COM", "b@example.com", "c@elsewhere.org"]
    refused, delivered = await sendmail(app, "a@example.org", recipients)
    assert delivered and refused == {
        "Former-Employee@Example.COM": (550, b"5.1.1 Mailbox unavailable"),
        "c@elsewhere.org": (550, b"5.7.1 Relay access denied"),
    }
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith(" a@example.org ['b@example.com']")


# -- mx through the command line -------------------------------------------------------------


def test_mx_served_by_minismtp_run_refuses_relay_and_greylists(tmp_path: Path) -> None:
    """As examples/mx.py's docstring runs it: ``MX_MAILDIR=... minismtp run examples.mx:app``."""
    inbound = tmp_path / "inbound"
    with run("examples.mx:app", cwd=tmp_path, MX_MAILDIR=str(inbound)) as running:
        with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
            code, ehlo = client.ehlo("client.example.org")
            assert code == 250 and b"SIZE 26214400" in ehlo.splitlines()
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("a@example.org", ["b@example.com", "c@other.org"], BODY)
    assert refused.value.recipients == {
        "b@example.com": (451, b"4.7.1 Greylisted, try again later"),
        "c@other.org": (550, b"5.7.1 Relay access denied"),
    }
    assert running.returncode == 0, running.output
    assert (inbound / "new").is_dir() and not any((inbound / "new").iterdir())


# -- lmtp_lists: one answer per recipient ----------------------------------------------------


@pytest.mark.anyio
async def test_lmtp_lists_answers_each_list_on_its_own_rfc2033_4_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The full LMTP run, through Postfix, is tests/test_postfix_lmtp.py."""
    from examples.lmtp_lists import app

    lists = ["dev@lists.example.com", "nope@lists.example.com", "announce@lists.example.com"]
    async with TestClient(app, lmtp=True) as client:
        replies = await client.send_message("someone@example.org", lists, BODY)
        owner = await client.send_message("owner@example.com", lists[2], BODY)
    assert [(r.code, r.status, r.text) for r in replies[-3:]] == [
        (250, "2.0.0", f"OK queued as {client.messages[0].id}"),
        (550, "5.1.1", "No such list"),
        (550, "5.7.1", "Only members may post to this list"),
    ]
    assert owner[-1].code == 250
    assert capsys.readouterr().out.splitlines() == [
        f"list dev: message {client.messages[0].id} from <someone@example.org>",
        f"list announce: message {client.messages[1].id} from <owner@example.com>",
    ]


# -- the hook-testing example ----------------------------------------------------------------


def test_hooks_example_passes_under_pytest() -> None:
    """examples/test_hooks_example.py, run the way its docstring says."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HOOKS_EXAMPLE],
        cwd=ROOT,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[1-9]\d* passed\b", result.stdout), result.stdout
