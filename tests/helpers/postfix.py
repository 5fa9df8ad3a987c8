"""A private Postfix instance for interoperability tests, started and stopped by the test.

It runs from its own configuration directory (``postfix -c DIR start``), with its queue, data
directory and log file (``maillog_file``: no syslog needed) under one temporary directory, and
a ``master.cf`` with only what delivering over LMTP needs. Mail goes in through an ``smtpd``
listening on a unix socket in the queue's ``public/`` folder (no TCP port, nothing to race
for); ``virtual_transport`` sends every recipient of ``domain`` over LMTP to ``lmtp_socket``.
Bounces to the sender are discarded.

The machine's own Postfix (``/etc/postfix``) is neither read nor changed; the Debian package
only has to be installed (``.ci/run`` installs it the way the README says, with a
``policy-rc.d`` that keeps the package from starting a daemon). Postfix starts as root.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

MASTER_CF = """\
inject    unix  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
lmtp      unix  -       -       n       -       -       lmtp
discard   unix  -       -       n       -       -       discard
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_STATUS = re.compile(r"postfix/lmtp\[\d+\]: \w+: to=<([^>]+)>.*? status=(\w+) \((.*)\)$")


def postfix_command() -> str | None:
    """The ``postfix`` command (in /usr/sbin, which a user's PATH may not hold)."""
    return shutil.which("postfix") or shutil.which("postfix", path="/usr/sbin:/usr/local/sbin")


def unavailable() -> str | None:
    """Why a Postfix instance cannot run here, or None."""
    if postfix_command() is None:
        return "Postfix is not installed (apt-get install postfix; .ci/run does)"
    if os.geteuid() != 0:
        return "Postfix starts as root only"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user (the Debian package creates it)"
    return None


class _UnixSMTP(smtplib.SMTP):
    """smtplib's client over a unix socket (its LMTP class would say LHLO to smtpd)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__()

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(self._path))
        return sock


@attrs.define
class Postfix:
    directory: Path  # everything of this instance: conf/, queue/, data/, maillog

    @property
    def config(self) -> Path:
        return self.directory / "conf"

    @property
    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def inject(self, sender: str, recipients: list[str], data: bytes) -> None:
        """Hand a message to this Postfix's smtpd, as a client on the network would."""
        with _UnixSMTP(self.directory / "queue" / "public" / "inject") as client:
            client.connect("localhost")
            client.sendmail(sender, recipients, data)

    def statuses(self, count: int, timeout: float = 30.0) -> dict[str, tuple[str, str]]:
        """``{recipient: (status, text)}`` of the LMTP client's deliveries, once ``count``
        recipients have one (Postfix gives no other signal than its log)."""
        deadline = time.monotonic() + timeout
        while True:
            found = {m[1]: (m[2], m[3]) for m in map(_STATUS.search, self.log.splitlines()) if m}
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Postfix logged {len(found)} of {count} deliveries:\n{self.log}"
                )
            time.sleep(0.05)


def main_cf(directory: Path, domain: str, lmtp_socket: Path) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {directory}/queue
data_directory = {directory}/data
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = {domain}
virtual_transport = lmtp:unix:{lmtp_socket}
default_transport = discard:
relay_transport = discard:
"""


@contextmanager
def private_directory() -> Iterator[Path]:
    """A directory the postfix user can reach (pytest's tmp_path is root's alone, 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="minismtp-postfix-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def running_postfix(directory: Path, domain: str, lmtp_socket: Path) -> Iterator[Postfix]:
    """Postfix from ``directory`` (see the module docstring) for the ``with`` block."""
    config = directory / "conf"
    config.mkdir()
    (config / "main.cf").write_text(main_cf(directory, domain, lmtp_socket))
    (config / "master.cf").write_text(MASTER_CF)
    (directory / "queue").mkdir(mode=0o755)
    data = directory / "data"
    data.mkdir(mode=0o700)
    owner = pwd.getpwnam("postfix")
    os.chown(data, owner.pw_uid, owner.pw_gid)
    postfix = Postfix(directory)
    command = postfix_command() or "postfix"
    started = subprocess.run(
        [command, "-c", str(config), "start"], capture_output=True, text=True, timeout=60
    )
    if started.returncode != 0:
        raise RuntimeError(f"postfix start failed:\n{started.stderr}{postfix.log}")
    try:
        yield postfix
    finally:
        # "stop" returns once the master process has gone (postfix-script waits for it).
        subprocess.run(
            [command, "-c", str(config), "stop"], capture_output=True, text=True, timeout=60
        )
