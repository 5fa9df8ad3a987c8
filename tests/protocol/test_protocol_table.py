"""Bytes in, replies out: the engine against RFC 5321 and its extensions, one row per rule.

Each row names the RFC section it checks. ``expected`` lists, for every reply after the
greeting, its code and (except for 354) its enhanced status code (RFC 3463, RFC 2034).
"""

from __future__ import annotations

import pytest

from minismtp.events import Event, Mail, Rcpt
from minismtp.protocol import Limits
from minismtp.types import Reply
from tests.helpers.engine_driver import drive

E = b"EHLO client.example\r\n"
M = b"MAIL FROM:<a@example.org>\r\n"
R = b"RCPT TO:<b@example.com>\r\n"
TX = E + M + R
MSG = b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"

OK = "250 2.0.0"
EHLO = "250"  # the EHLO/HELO reply carries no enhanced status code (RFC 2034 3)
MAIL_OK = "250 2.1.0"
RCPT_OK = "250 2.1.5"
QUEUED = "250 2.0.0"
SYNTAX = "500 5.5.2"
ARGS = "501 5.5.4"
SEQ = "503 5.5.1"
PARAM = "555 5.5.4"
BAD_FROM = "501 5.1.7"
BAD_TO = "501 5.1.3"

# A table, one case a line: not formatted.
# fmt: off
CASES: list[tuple[str, bytes, list[str], dict[str, object]]] = [
    # RFC 5321 4.1.1.1 HELO / EHLO
    ("4.1.1.1 EHLO", E, [EHLO], {}),
    ("4.1.1.1 HELO", b"HELO client.example\r\n", [EHLO], {}),
    ("4.1.1.1 EHLO needs a domain", b"EHLO\r\n", [ARGS], {}),
    ("4.1.1.1 HELO needs a domain", b"HELO\r\n", [ARGS], {}),
    ("4.1.1.1 EHLO only spaces", b"EHLO   \r\n", [ARGS], {}),
    ("2.4 verbs are case-insensitive: ehlo", b"ehlo x\r\n", [EHLO], {}),
    ("2.4 verbs are case-insensitive: EhLo", b"EhLo x\r\n", [EHLO], {}),
    ("4.1.1.1 EHLO twice", E + E, [EHLO, EHLO], {}),
    ("4.1.1.1 EHLO address literal", b"EHLO [192.0.2.1]\r\n", [EHLO], {}),
    ("4.1.4 EHLO resets the transaction", E + M + E + R, [EHLO, MAIL_OK, EHLO, SEQ], {}),
    ("4.1.4 HELO resets the transaction", E + M + b"HELO x\r\n" + R, [EHLO, MAIL_OK, EHLO, SEQ], {}),
    ("RFC 1869 4.2: no parameters after HELO", b"HELO x\r\nMAIL FROM:<a@b.c> SIZE=10\r\n", [EHLO, PARAM], {}),
    ("4.1.1.2 MAIL after HELO", b"HELO x\r\n" + M, [EHLO, MAIL_OK], {}),
    # RFC 5321 4.1.1.2 MAIL and 4.1.2 path syntax
    ("4.1.4 MAIL before EHLO", M, [SEQ], {}),
    ("4.1.1.2 MAIL", E + M, [EHLO, MAIL_OK], {}),
    ("4.1.1.2 null reverse-path", E + b"MAIL FROM:<>\r\n", [EHLO, MAIL_OK], {}),
    ("4.1.1.2 space after colon tolerated", E + b"MAIL FROM: <a@b.c>\r\n", [EHLO, MAIL_OK], {}),
    ("2.4 mail from: lower case", E + b"mail from:<a@b.c>\r\n", [EHLO, MAIL_OK], {}),
    ("4.1.2 path needs brackets", E + b"MAIL FROM:a@b.c\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 unterminated path", E + b"MAIL FROM:<a@b.c\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.1.2 MAIL TO: is not MAIL FROM:", E + b"MAIL TO:<a@b.c>\r\n", [EHLO, ARGS], {}),
    ("4.1.1.2 MAIL with no argument", E + b"MAIL\r\n", [EHLO, ARGS], {}),
    ("4.1.2 empty domain", E + b"MAIL FROM:<a@>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 empty local part", E + b"MAIL FROM:<@b.c>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 dot-string: no double dot", E + b"MAIL FROM:<a..b@c.d>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 dot-string: no leading dot", E + b"MAIL FROM:<.a@c.d>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 dot-string: no trailing dot", E + b"MAIL FROM:<a.@c.d>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 atext specials", E + b"MAIL FROM:<a!#$%&'*+-/=?^_`{|}~@c.d>\r\n", [EHLO, MAIL_OK], {}),
    ("4.1.2 quoted-string local part", E + b'MAIL FROM:<"a b"@c.d>\r\n', [EHLO, MAIL_OK], {}),
    ("4.1.2 quoted-pair", E + b'MAIL FROM:<"a\\"b"@c.d>\r\n', [EHLO, MAIL_OK], {}),
    ("4.1.2 quoted '>' inside", E + b'MAIL FROM:<"a>b"@c.d>\r\n', [EHLO, MAIL_OK], {}),
    ("4.1.2 unterminated quoted string", E + b'MAIL FROM:<"ab@c.d>\r\n', [EHLO, BAD_FROM], {}),
    ("4.1.3 IPv4 address literal", E + b"MAIL FROM:<a@[192.0.2.1]>\r\n", [EHLO, MAIL_OK], {}),
    ("4.1.3 IPv6 address literal", E + b"MAIL FROM:<a@[IPv6:2001:db8::1]>\r\n", [EHLO, MAIL_OK], {}),
    ("4.1.3 IPv4 octet over 255", E + b"MAIL FROM:<a@[999.0.0.1]>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.3 bad IPv6 literal", E + b"MAIL FROM:<a@[IPv6:zz::1]>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.3 general address literal", E + b"MAIL FROM:<a@[x-tag:abc]>\r\n", [EHLO, MAIL_OK], {}),
    ("C source route ignored", E + b"MAIL FROM:<@x.y,@z.w:a@b.c>\r\n", [EHLO, MAIL_OK], {}),
    ("4.1.2 sub-domain starts with a hyphen", E + b"MAIL FROM:<a@-b.c>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 sub-domain ends with a hyphen", E + b"MAIL FROM:<a@b-.c>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 underscore in a domain", E + b"MAIL FROM:<a@b_c.d>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 empty sub-domain", E + b"MAIL FROM:<a@b..c>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 single-label domain", E + b"MAIL FROM:<a@localhost>\r\n", [EHLO, MAIL_OK], {}),
    ("4.1.2 two @", E + b"MAIL FROM:<a@b@c.d>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.2 junk after the path", E + b"MAIL FROM:<a@b.c>x\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.1.2 tab is not a separator", E + b"MAIL FROM:\t<a@b.c>\r\n", [EHLO, BAD_FROM], {}),
    ("4.1.1.2 <postmaster> is no sender", E + b"MAIL FROM:<postmaster>\r\n", [EHLO, BAD_FROM], {}),
    ("3.3 nested MAIL", E + M + M, [EHLO, MAIL_OK, SEQ], {}),
    ("RFC 1870 SIZE", E + b"MAIL FROM:<a@b.c> SIZE=1000\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 1870 SIZE not a number", E + b"MAIL FROM:<a@b.c> SIZE=abc\r\n", [EHLO, ARGS], {}),
    ("RFC 1870 SIZE without value", E + b"MAIL FROM:<a@b.c> SIZE\r\n", [EHLO, ARGS], {}),
    ("RFC 1870 6.3 SIZE over the limit", E + b"MAIL FROM:<a@b.c> SIZE=99999999999\r\n", [EHLO, "552 5.3.4"], {}),
    ("RFC 1870 SIZE at the limit", E + b"MAIL FROM:<a@b.c> SIZE=33554432\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 6152 BODY=8BITMIME", E + b"MAIL FROM:<a@b.c> BODY=8BITMIME\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 6152 BODY=7BIT", E + b"MAIL FROM:<a@b.c> BODY=7bit\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 3030 BINARYMIME is not advertised", E + b"MAIL FROM:<a@b.c> BODY=BINARYMIME\r\n", [EHLO, PARAM], {}),
    ("RFC 6152 BODY without value", E + b"MAIL FROM:<a@b.c> BODY\r\n", [EHLO, ARGS], {}),
    ("RFC 6531 SMTPUTF8", E + b"MAIL FROM:<a@b.c> SMTPUTF8\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 6531 SMTPUTF8 takes no value", E + b"MAIL FROM:<a@b.c> SMTPUTF8=yes\r\n", [EHLO, ARGS], {}),
    ("RFC 3461 RET and ENVID", E + b"MAIL FROM:<a@b.c> RET=FULL ENVID=QQ314159\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 3461 RET=HDRS", E + b"MAIL FROM:<a@b.c> RET=hdrs\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 3461 bad RET", E + b"MAIL FROM:<a@b.c> RET=BAD\r\n", [EHLO, ARGS], {}),
    ("RFC 3461 ENVID must be xtext", E + b"MAIL FROM:<a@b.c> ENVID=a+zz\r\n", [EHLO, ARGS], {}),
    ("RFC 4954 5 AUTH=<> from Exchange", E + b"MAIL FROM:<a@b.c> AUTH=<>\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 4954 5 AUTH=address", E + b"MAIL FROM:<a@b.c> AUTH=a@b.c\r\n", [EHLO, MAIL_OK], {}),
    ("RFC 4954 5 AUTH without value", E + b"MAIL FROM:<a@b.c> AUTH\r\n", [EHLO, ARGS], {}),
    ("4.1.2 unknown parameter", E + b"MAIL FROM:<a@b.c> FOO=bar\r\n", [EHLO, PARAM], {}),
    ("4.1.2 unknown parameter, no value", E + b"MAIL FROM:<a@b.c> XYZ\r\n", [EHLO, PARAM], {}),
    ("4.1.2 duplicate parameter", E + b"MAIL FROM:<a@b.c> SIZE=1 SIZE=2\r\n", [EHLO, ARGS], {}),
    ("4.1.2 esmtp-keyword syntax", E + b"MAIL FROM:<a@b.c> -X=1\r\n", [EHLO, ARGS], {}),
    ("4.1.2 esmtp-value excludes '='", E + b"MAIL FROM:<a@b.c> SIZE=1=2\r\n", [EHLO, ARGS], {}),
    ("4.1.2 empty esmtp-value", E + b"MAIL FROM:<a@b.c> SIZE=\r\n", [EHLO, ARGS], {}),
    ("RFC 6531 3.3 UTF-8 sender with SMTPUTF8", E + "MAIL FROM:<jörg@bücher.de> SMTPUTF8\r\n".encode(), [EHLO, MAIL_OK], {}),
    ("RFC 6531 3.5 UTF-8 sender without SMTPUTF8", E + "MAIL FROM:<jörg@bücher.de>\r\n".encode(), [EHLO, "553 5.6.7"], {}),
    ("2.3.8 invalid UTF-8 in a command", E + b"MAIL FROM:<\xff@b.c>\r\n", [EHLO, SYNTAX], {}),
    ("4.1.1.2 two spaces before parameters", E + b"MAIL FROM:<a@b.c>  SIZE=10\r\n", [EHLO, MAIL_OK], {}),
    # RFC 5321 4.1.1.3 RCPT
    ("3.3 RCPT before MAIL", E + R, [EHLO, SEQ], {}),
    ("4.1.1.3 RCPT", TX, [EHLO, MAIL_OK, RCPT_OK], {}),
    ("4.5.1 <postmaster>", E + M + b"RCPT TO:<postmaster>\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("4.5.1 <Postmaster> any case", E + M + b"RCPT TO:<PostMaster>\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("4.5.1 <postmaster@domain>", E + M + b"RCPT TO:<postmaster@example.com>\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("4.1.1.3 <> is no recipient", E + M + b"RCPT TO:<>\r\n", [EHLO, MAIL_OK, BAD_TO], {}),
    ("4.1.2 recipient needs brackets", E + M + b"RCPT TO:b@c.d\r\n", [EHLO, MAIL_OK, BAD_TO], {}),
    ("4.1.1.3 RCPT FROM: is not RCPT TO:", E + M + b"RCPT FROM:<b@c.d>\r\n", [EHLO, MAIL_OK, ARGS], {}),
    ("4.1.1.3 RCPT with no argument", E + M + b"RCPT\r\n", [EHLO, MAIL_OK, ARGS], {}),
    ("2.4 rcpt to: lower case", E + M + b"rcpt to:<b@c.d>\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("4.1.1.3 space after TO: tolerated", E + M + b"RCPT TO: <b@c.d>\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("4.1.1.3 duplicate recipient", TX + R, [EHLO, MAIL_OK, RCPT_OK, RCPT_OK], {}),
    ("RFC 3461 NOTIFY", E + M + b"RCPT TO:<b@c.d> NOTIFY=SUCCESS,FAILURE\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("RFC 3461 NOTIFY=NEVER", E + M + b"RCPT TO:<b@c.d> NOTIFY=NEVER\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("RFC 3461 NEVER stands alone", E + M + b"RCPT TO:<b@c.d> NOTIFY=NEVER,DELAY\r\n", [EHLO, MAIL_OK, ARGS], {}),
    ("RFC 3461 bad NOTIFY", E + M + b"RCPT TO:<b@c.d> NOTIFY=SOMETIMES\r\n", [EHLO, MAIL_OK, ARGS], {}),
    ("RFC 3461 ORCPT", E + M + b"RCPT TO:<b@c.d> ORCPT=rfc822;b+40c.d\r\n", [EHLO, MAIL_OK, RCPT_OK], {}),
    ("RFC 3461 bad ORCPT", E + M + b"RCPT TO:<b@c.d> ORCPT=nosemicolon\r\n", [EHLO, MAIL_OK, ARGS], {}),
    ("4.1.2 unknown RCPT parameter", E + M + b"RCPT TO:<b@c.d> FOO=1\r\n", [EHLO, MAIL_OK, PARAM], {}),
    ("RFC 1870 SIZE is a MAIL parameter", E + M + b"RCPT TO:<b@c.d> SIZE=1\r\n", [EHLO, MAIL_OK, PARAM], {}),
    ("4.5.3.1.8 too many recipients", E + M + R + b"RCPT TO:<c@d.e>\r\nRCPT TO:<d@e.f>\r\n", [EHLO, MAIL_OK, RCPT_OK, RCPT_OK, "452 4.5.3"], {"limits": Limits(max_recipients=2)}),
    ("RFC 6531 UTF-8 recipient without SMTPUTF8", E + M + "RCPT TO:<jörg@bücher.de>\r\n".encode(), [EHLO, MAIL_OK, "553 5.6.7"], {}),
    ("RFC 6531 UTF-8 recipient with SMTPUTF8", E + b"MAIL FROM:<a@b.c> SMTPUTF8\r\n" + "RCPT TO:<jörg@bücher.de>\r\n".encode(), [EHLO, MAIL_OK, RCPT_OK], {}),
    ("4.1.1.5 RCPT after RSET", E + M + b"RSET\r\n" + R, [EHLO, MAIL_OK, OK, SEQ], {}),
    # RFC 5321 4.1.1.4 DATA
    ("3.3 DATA before MAIL", E + b"DATA\r\n", [EHLO, SEQ], {}),
    ("3.3 DATA without a recipient", E + M + b"DATA\r\n", [EHLO, MAIL_OK, "554 5.5.1"], {}),
    ("4.1.1.4 DATA takes no argument", TX + b"DATA x\r\n", [EHLO, MAIL_OK, RCPT_OK, ARGS], {}),
    ("4.1.1.4 DATA", TX + MSG, [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {}),
    ("4.1.1.4 empty message", TX + b"DATA\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {}),
    ("4.1.4 transaction over after DATA", TX + MSG + R, [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED, SEQ], {}),
    ("3.3 two transactions", TX + MSG + M + R + MSG, [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED, MAIL_OK, RCPT_OK, "354", QUEUED], {}),
    ("4.5.2 bare LF refused", TX + b"DATA\r\na\nb\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", "550 5.5.2"], {}),
    ("4.5.2 bare CR refused", TX + b"DATA\r\na\rb\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", "550 5.5.2"], {}),
    ("4.5.2 bare CR and LF around a line's dot refused", TX + b"DATA\r\na\r\r\n.\nb\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", "550 5.5.2"], {}),
    ("4.5.2 bare LF normalised on request", TX + b"DATA\r\na\nb\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {"limits": Limits(accept_bare_line_endings=True)}),
    ("RFC 1870 message over the size", TX + b"DATA\r\n" + b"x" * 98 + b"\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", "552 5.3.4"], {"limits": Limits(max_message_size=99)}),
    ("RFC 1870 message at the size", TX + b"DATA\r\n" + b"x" * 98 + b"\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {"limits": Limits(max_message_size=100)}),
    ("RFC 1870 stuffed dots do not count", TX + b"DATA\r\n" + b"..x\r\n" * 20 + b".\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {"limits": Limits(max_message_size=80)}),
    ("4.5.3.1.6 text line too long", TX + b"DATA\r\n" + b"x" * 999 + b"\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", SYNTAX], {}),
    ("4.5.3.1.6 text line at the limit", TX + b"DATA\r\n" + b"x" * 998 + b"\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {}),
    ("4.5.3.1.6 text line limit off", TX + b"DATA\r\n" + b"x" * 5000 + b"\r\n.\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED], {"limits": Limits(max_text_line=0)}),
    ("RFC 1870 next transaction after 552", TX + b"DATA\r\n" + b"x" * 200 + b"\r\n.\r\n" + M + R + MSG, [EHLO, MAIL_OK, RCPT_OK, "354", "552 5.3.4", MAIL_OK, RCPT_OK, "354", QUEUED], {"limits": Limits(max_message_size=100)}),
    # RFC 3030 BDAT (CHUNKING)
    ("RFC 3030 BDAT LAST", TX + b"BDAT 5 LAST\r\nhello", [EHLO, MAIL_OK, RCPT_OK, QUEUED], {}),
    ("RFC 3030 two chunks", TX + b"BDAT 3\r\nabcBDAT 2 LAST\r\nde", [EHLO, MAIL_OK, RCPT_OK, OK, QUEUED], {}),
    ("RFC 3030 BDAT 0 LAST ends", TX + b"BDAT 3\r\nabcBDAT 0 LAST\r\n", [EHLO, MAIL_OK, RCPT_OK, OK, QUEUED], {}),
    ("RFC 3030 BDAT before MAIL is read, then 503", E + b"BDAT 4\r\nNOOPNOOP\r\n", [EHLO, SEQ, OK], {}),
    ("RFC 3030 BDAT without recipient", E + M + b"BDAT 4 LAST\r\nabcd", [EHLO, MAIL_OK, "554 5.5.1"], {}),
    ("RFC 3030 BDAT size not a number", TX + b"BDAT x\r\n", [EHLO, MAIL_OK, RCPT_OK, ARGS], {}),
    ("RFC 3030 BDAT bad keyword", TX + b"BDAT 5 FOO\r\n", [EHLO, MAIL_OK, RCPT_OK, ARGS], {}),
    ("RFC 3030 bdat last, lower case", TX + b"bdat 2 last\r\nab", [EHLO, MAIL_OK, RCPT_OK, QUEUED], {}),
    ("RFC 3030 chunk over the size", TX + b"BDAT 200 LAST\r\n" + b"x" * 200 + b"NOOP\r\n", [EHLO, MAIL_OK, RCPT_OK, "552 5.3.4", OK], {"limits": Limits(max_message_size=100)}),
    ("RFC 3030 chunk bytes are not commands", TX + b"BDAT 11 LAST\r\n\r\n.\r\nQUIT\r\n", [EHLO, MAIL_OK, RCPT_OK, QUEUED], {}),
    ("RFC 3030 bare LF in a chunk refused", TX + b"BDAT 3 LAST\r\na\nb", [EHLO, MAIL_OK, RCPT_OK, "550 5.5.2"], {}),
    ("RFC 3030 CRLF split between chunks", TX + b"BDAT 3\r\nab\rBDAT 2 LAST\r\n\nc", [EHLO, MAIL_OK, RCPT_OK, OK, QUEUED], {}),
    ("RFC 3030 CR ending a chunk, no LF after", TX + b"BDAT 3\r\nab\rBDAT 2 LAST\r\nxc", [EHLO, MAIL_OK, RCPT_OK, OK, "550 5.5.2"], {}),
    ("RFC 3030 content ending in a CR", TX + b"BDAT 2\r\nabBDAT 1 LAST\r\n\r", [EHLO, MAIL_OK, RCPT_OK, OK, "550 5.5.2"], {}),
    ("RFC 3030 DATA after BDAT", TX + b"BDAT 3\r\nabcDATA\r\n", [EHLO, MAIL_OK, RCPT_OK, OK, SEQ], {}),
    ("RFC 3030 BDAT after a finished BDAT", TX + b"BDAT 1 LAST\r\naBDAT 1\r\nb", [EHLO, MAIL_OK, RCPT_OK, QUEUED, SEQ], {}),
    # RFC 5321 4.1.1.5 to 4.1.1.10
    ("4.1.1.5 RSET", E + b"RSET\r\n", [EHLO, OK], {}),
    ("4.1.1.5 RSET takes no argument", E + b"RSET x\r\n", [EHLO, ARGS], {}),
    ("4.1.1.5 RSET keeps the session", E + b"RSET\r\n" + M, [EHLO, OK, MAIL_OK], {}),
    ("4.1.1.5 RSET before EHLO", b"RSET\r\n", [OK], {}),
    ("4.1.1.9 NOOP", b"NOOP\r\n", [OK], {}),
    ("4.1.1.9 NOOP with a string", b"NOOP hello there\r\n", [OK], {}),
    ("4.1.1.6 VRFY answers 252", E + b"VRFY someone\r\n", [EHLO, "252 2.5.0"], {}),
    ("4.1.1.6 VRFY needs an argument", E + b"VRFY\r\n", [EHLO, ARGS], {}),
    ("4.1.1.7 EXPN not implemented", E + b"EXPN staff\r\n", [EHLO, "502 5.5.1"], {}),
    ("4.1.1.8 HELP answers 214", b"HELP\r\n", ["214 2.0.0"], {}),
    ("4.1.1.8 HELP with a topic", b"HELP MAIL\r\n", ["214 2.0.0"], {}),
    ("4.1.1.10 QUIT", E + b"QUIT\r\n", [EHLO, "221 2.0.0"], {}),
    ("4.1.1.10 QUIT takes no argument", b"QUIT now\r\n", [ARGS], {}),
    ("4.1.1.10 nothing after QUIT", b"QUIT\r\nNOOP\r\n", ["221 2.0.0"], {}),
    ("4.1.1.10 QUIT aborts a transaction", TX + b"QUIT\r\n", [EHLO, MAIL_OK, RCPT_OK, "221 2.0.0"], {}),
    # RFC 3207 STARTTLS
    ("RFC 3207 STARTTLS without a certificate", E + b"STARTTLS\r\n", [EHLO, "502 5.5.1"], {}),
    ("RFC 3207 4 STARTTLS", E + b"STARTTLS\r\n", [EHLO, "220 2.0.0"], {"tls_available": True}),
    ("RFC 3207 4 STARTTLS takes no argument", E + b"STARTTLS x\r\n", [EHLO, ARGS], {"tls_available": True}),
    ("RFC 3207 4.2 EHLO needed after TLS", E + b"STARTTLS\r\n", [EHLO, "220 2.0.0"], {"tls_available": True}),
    ("RFC 3207 4.2 pipelined commands dropped", E + b"STARTTLS\r\nMAIL FROM:<a@b.c>\r\n", [EHLO, "220 2.0.0"], {"tls_available": True}),
    ("RFC 3207 4.2 after TLS, MAIL needs EHLO", [E + b"STARTTLS\r\n", M], [EHLO, "220 2.0.0", SEQ], {"tls_available": True}),
    ("RFC 3207 4.2 STARTTLS twice", [E + b"STARTTLS\r\n", E + b"STARTTLS\r\n"], [EHLO, "220 2.0.0", EHLO, SEQ], {"tls_available": True}),
    ("RFC 3207 4.1 require TLS", E + M, [EHLO, "530 5.7.0"], {"require_tls": True, "tls_available": True}),
    ("RFC 3207 4.1 TLS satisfies the requirement", [E + b"STARTTLS\r\n", E + M], [EHLO, "220 2.0.0", EHLO, MAIL_OK], {"require_tls": True, "tls_available": True}),
    # RFC 5321 2.3.8, 4.5.3.1.4 command lines
    ("4.2.4 unknown command", b"FOO\r\n", [SYNTAX], {}),
    ("4.2.4 empty line", b"\r\n", [SYNTAX], {}),
    ("4.2.4 leading space", b" NOOP\r\n", [SYNTAX], {}),
    ("4.1.1 trailing space after a verb", b"NOOP \r\nQUIT \r\n", [OK, "221 2.0.0"], {}),
    ("4.5.3.1.4 line of 512 octets", b"NOOP " + b"x" * 505 + b"\r\n", [OK], {}),
    ("4.5.3.1.4 line of 513 octets", b"NOOP " + b"x" * 506 + b"\r\n", [SYNTAX], {}),
    ("4.5.3.1.4 huge line, then a command", [b"NOOP " + b"x" * 4000] * 25 + [b"\r\nNOOP\r\n"], [SYNTAX, OK], {}),
    ("4.5.3.1.4 CRLF split over the skip", [b"x" * 600 + b"\r", b"\nNOOP\r\n"], [SYNTAX, OK], {}),
    ("2.3.8 bare LF is not a line end", b"NOOP\nNOOP\r\n", [SYNTAX], {}),
    ("2.3.8 bare CR is not a line end", b"NOOP\rNOOP\r\n", [SYNTAX], {}),
    ("2.3.8 no command smuggled past a bare LF", E + b"MAIL FROM:<a@b.c>\nRCPT TO:<x@y.z>\r\n", [EHLO, SYNTAX], {}),
    ("2.3.8 a line may be cut anywhere", [bytes([c]) for c in TX], [EHLO, MAIL_OK, RCPT_OK], {}),
    ("RFC 2920 a pipelined session", TX + MSG + b"QUIT\r\n", [EHLO, MAIL_OK, RCPT_OK, "354", QUEUED, "221 2.0.0"], {}),
    ("limits: too many errors", b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\n", [SYNTAX, SYNTAX, SYNTAX, "421 4.7.0"], {"limits": Limits(max_errors=3)}),
    ("limits: too many junk commands", b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n", [OK, OK, OK, OK, "421 4.7.0"], {"limits": Limits(max_junk_commands=3)}),
    ("limits: a message resets the junk count", b"NOOP\r\nNOOP\r\n" + TX + MSG + b"NOOP\r\nNOOP\r\n", [OK, OK, EHLO, MAIL_OK, RCPT_OK, "354", QUEUED, OK, OK], {"limits": Limits(max_junk_commands=3)}),
]
# fmt: on

PROBES = [
    ("HTTP GET", b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n"),
    ("HTTP POST", b"POST /x HTTP/1.1\r\n"),
    ("proxy CONNECT", b"CONNECT mx:25 HTTP/1.1\r\n"),
    ("header line", b"Host: mx.test\r\n"),
    ("User-Agent header", b"User-Agent: curl\r\n"),
]


@pytest.mark.parametrize(
    ("data", "expected", "options"),
    [pytest.param(data, expected, options, id=name) for name, data, expected, options in CASES],
)
def test_wire(data: bytes | list[bytes], expected: list[str], options: dict[str, object]) -> None:
    run = drive(data, **options)  # type: ignore[arg-type]
    assert run.codes == expected


@pytest.mark.parametrize(("data"), [pytest.param(d, id=n) for n, d in PROBES])
def test_http_and_proxy_probes_end_the_session_unanswered(data: bytes) -> None:
    """Postfix's practice: a web request on the SMTP port is dropped at once."""
    run = drive(E + data + b"NOOP\r\n")
    assert run.codes == [EHLO]
    assert run.closed


def test_ehlo_lists_the_extensions() -> None:
    """RFC 5321 4.1.1.1, RFC 2920, RFC 1870, RFC 6152, RFC 6531, RFC 2034, RFC 3030."""
    ehlo = drive(E).out.decode().split("\r\n")[1:-1]
    assert ehlo == [
        "250-mx.test",
        "250-PIPELINING",
        "250-SIZE 33554432",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250-CHUNKING",
        "250 HELP",
    ]


def test_starttls_is_advertised_only_until_tls_is_active() -> None:
    """RFC 3207 4.2: after the handshake the EHLO reply no longer offers STARTTLS."""
    run = drive([E + b"STARTTLS\r\n", E], tls_available=True)
    before, after = run.out.decode().split("220 2.0.0 Ready to start TLS\r\n")
    assert "250-STARTTLS" in before
    assert "STARTTLS" not in after
    assert run.engine.session.tls is not None


def test_the_greeting_is_the_apps() -> None:
    run = drive(b"")
    assert run.out == b"220 mx.test ESMTP\r\n"
    assert run.closed


def test_a_refused_greeting_closes() -> None:
    """RFC 5321 3.1: a 554 greeting; we close rather than wait for QUIT."""
    run = drive(b"NOOP\r\n", respond=lambda e: Reply(554, "5.7.1", "Go away"))
    assert run.out == b"554 5.7.1 Go away\r\n"
    assert run.closed


def test_duplicate_recipient_is_recorded_once() -> None:
    """RFC 5321 4.1.1.3: a duplicate RCPT is harmless; deliver once."""
    run = drive(TX + R + b"RCPT TO:<b@EXAMPLE.COM>\r\n" + MSG)
    assert sum(isinstance(e, Rcpt) for e in run.events) == 1
    data_event = run.events[-1]
    assert [str(a) for a in data_event.transaction.rcpt_to] == ["b@example.com"]  # type: ignore[attr-defined]


def _refuse(kind: type[Event], reply: Reply) -> object:
    return lambda e: reply if isinstance(e, kind) else None


def test_a_refused_sender_opens_no_transaction() -> None:
    run = drive(TX, respond=_refuse(Mail, Reply(550, "5.7.1", "No")))  # type: ignore[arg-type]
    assert run.codes == [EHLO, "550 5.7.1", SEQ]


def test_refused_recipients_leave_data_without_recipients() -> None:
    run = drive(TX + MSG, respond=_refuse(Rcpt, Reply(550, "5.1.1", "Unknown user")))  # type: ignore[arg-type]
    assert run.codes[:4] == [EHLO, MAIL_OK, "550 5.1.1", "554 5.5.1"]
    assert run.messages == []


def test_an_app_reply_without_status_gets_the_class_status() -> None:
    """RFC 3463 / RFC 2034: with ENHANCEDSTATUSCODES every reply carries one."""
    run = drive(TX, respond=_refuse(Rcpt, Reply(550, None, "No such user")))  # type: ignore[arg-type]
    assert run.replies[-1] == "550 5.0.0 No such user"


def test_421_from_the_app_closes_the_session() -> None:
    run = drive(TX + b"NOOP\r\n", respond=_refuse(Rcpt, Reply(421, "4.3.2", "Shutting down")))  # type: ignore[arg-type]
    assert run.codes == [EHLO, MAIL_OK, "421 4.3.2"]
    assert run.closed


def test_dot_unstuffing_gives_the_content_meant() -> None:
    """RFC 5321 4.5.2: the first dot of a line starting with a dot is removed."""
    run = drive(TX + b"DATA\r\n.first\r\n..\r\n...x\r\nmid.dle\r\n.\r\n")
    assert run.messages == [b"first\r\n.\r\n..x\r\nmid.dle\r\n"]


def test_empty_message_is_empty() -> None:
    assert drive(TX + b"DATA\r\n.\r\n").messages == [b""]


def test_bare_line_ends_are_normalised_when_asked() -> None:
    run = drive(TX + b"DATA\r\na\nb\rc\r\n.\r\n", limits=Limits(accept_bare_line_endings=True))
    assert run.messages == [b"a\r\nb\r\nc\r\n"]


def test_bdat_content_is_exact() -> None:
    """RFC 3030 2: chunk content is taken as is, dots and all."""
    run = drive(TX + b"BDAT 4\r\n.a\r\nBDAT 5 LAST\r\n..b\r\n")
    assert run.messages == [b".a\r\n..b\r\n"]


def test_size_limit_holds_memory_while_streaming() -> None:
    """RFC 1870: bytes past the limit are counted and dropped, never kept."""
    chunks = [TX + b"DATA\r\n"] + [b"y" * 60 + b"\r\n"] * 20_000 + [b".\r\nNOOP\r\n"]
    run = drive(chunks, limits=Limits(max_message_size=10_000))
    assert run.codes == [EHLO, MAIL_OK, RCPT_OK, "354", "552 5.3.4", OK]


def test_eof_in_data_loses_the_transaction() -> None:
    run = drive(TX + b"DATA\r\nhalf a message\r\n")
    assert run.closed and run.messages == []


def test_eof_mid_command_closes() -> None:
    run = drive(E + b"MAIL FROM:<a@b")
    assert run.closed and run.codes == [EHLO]


def test_session_records_helo_and_esmtp() -> None:
    run = drive(b"HELO old.client\r\n")
    assert run.engine.session.helo_name == "old.client"
    assert run.engine.session.esmtp is False
    run = drive(E)
    assert run.engine.session.helo_name == "client.example"
    assert run.engine.session.esmtp is True


def test_parameters_reach_the_app() -> None:
    run = drive(
        E
        + b"MAIL FROM:<a@b.c> SIZE=10 body=8bitmime AUTH=<>\r\n"
        + R
        + b"RCPT TO:<x@y.z> NOTIFY=NEVER\r\n"
    )
    mail = run.events[2]
    assert isinstance(mail, Mail)
    assert mail.params == {"SIZE": "10", "BODY": "8bitmime", "AUTH": "<>"}
    assert mail.transaction.declared_size == 10
    assert mail.transaction.body_type == "8BITMIME"
    assert mail.transaction.rcpt_params == [{}, {"NOTIFY": "NEVER"}]


def test_pipelined_replies_come_out_in_one_batch() -> None:
    """RFC 2920 3.1: the replies to a pipelined group can be sent in one write."""
    from minismtp.protocol import NEED_DATA, Engine
    from minismtp.types import Session

    engine = Engine(Session())
    engine.next_event()
    engine.respond(Reply(220, None, "mx"))
    assert engine.next_event() is NEED_DATA
    assert engine.data_to_send() == b"220 mx\r\n"
    engine.receive_data(b"NOOP\r\nNOOP\r\nRSET\r\nHELP\r\n")
    assert engine.next_event() is NEED_DATA
    assert engine.data_to_send().count(b"\r\n") == 4


def test_table_has_at_least_150_rows() -> None:
    assert len(CASES) + len(PROBES) >= 150


def test_finished_transactions_carry_the_reply_that_ended_them() -> None:
    """For logs and metrics: accepted, refused by the engine, abandoned by RSET or QUIT."""
    big = TX + b"DATA\r\n" + b"x" * 200 + b"\r\n.\r\n"
    run = drive(
        TX + MSG + big[len(E) :] + M + b"RSET\r\n" + M + R + b"QUIT\r\n",
        limits=Limits(max_message_size=100),
    )
    finished = run.engine.finished
    assert [t.reply_code for t in finished] == [250, 552, None, None]
    assert finished[0].size == len(b"Subject: hi\r\n\r\nbody\r\n")
