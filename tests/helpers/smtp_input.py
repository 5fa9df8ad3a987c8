"""SMTP-ish input for property tests, and the check of what comes back: shared by the
engine's properties (tests/protocol) and the real server's fuzz test (tests/server), which
must answer the same bytes the same way."""

from __future__ import annotations

import itertools
import re

from hypothesis import strategies as st

from minismtp.protocol import Limits

LIMITS = Limits(
    max_message_size=2_000, max_command_line=128, max_errors=1_000, max_junk_commands=1_000
)
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -])[^\r\n]*\r\n")

TOKENS = [
    b"EHLO x\r\n",
    b"HELO y\r\n",
    b"MAIL FROM:<a@b.c>\r\n",
    b"MAIL FROM:<>\r\n",
    b"RCPT TO:<d@e.f>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"BDAT 3\r\n",
    b"BDAT 2 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
    b"VRFY a\r\n",
    b"x" * 300,
    b"MAIL FROM:<a@b.c> SIZE=10 BODY=8BITMIME\r\n",
    b"\r\n.\r\n",
    b"\xff\xfe",
]
smtpish = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=40), max_size=40).map(b"".join)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def check_replies(out: bytes) -> None:
    """Every reply is ``code SP text CRLF``, multi-line ones with one code throughout."""
    pos = 0
    code = None
    for match in REPLY_LINE.finditer(out):
        assert match.start() == pos, out[pos : pos + 80]
        line_code = match.group()[:3]
        assert code in (None, line_code)
        code = None if match.group(1) == b" " else line_code
        pos = match.end()
    assert pos == len(out) and code is None
