"""TLS for the server: the certificate, its reload, and the handshake (RFC 3207, RFC 8314).

The server holds one :class:`TLSConfig`. Every handshake takes the context current at that
moment, so :meth:`TLSConfig.reload` (the CLI calls it on SIGHUP) changes the certificate for
new connections without touching those already open.
"""

from __future__ import annotations

import logging
import os
import ssl

import anyio
import attrs
from anyio.abc import AnyByteStream
from anyio.streams.tls import TLSStream

from minismtp.types import TLSInfo

log = logging.getLogger("minismtp.tls")

StrPath = str | os.PathLike[str]

# RFC 4514 short names for the attributes a certificate subject usually holds.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def server_context(
    cert_path: StrPath, key_path: StrPath | None = None, client_ca_path: StrPath | None = None
) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, the standard library's defaults otherwise.

    ``cert_path`` is PEM and may hold the whole chain (leaf first); ``key_path`` may be left
    out when the key is in the same file. Client certificates are asked for only when
    ``client_ca_path`` names the CAs to check them against: Python cannot ask for a
    certificate without verifying it, and an MX must not refuse a client for offering one.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cert_chain(context, cert_path, key_path)
    if client_ca_path is not None:
        context.load_verify_locations(client_ca_path)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class TLSLoadError(ValueError):
    """The certificate or the key cannot be used; the text names the file and the problem."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, and a server would hang there.
    raise TLSLoadError("is encrypted (give the key without a passphrase)")


def _read_pem(path: StrPath, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        problem = (exc.strerror or str(exc)).lower()
        raise TLSLoadError(f"cannot read the TLS {what} {os.fspath(path)!r}: {problem}") from exc


def _load_cert_chain(context: ssl.SSLContext, cert_path: StrPath, key_path: StrPath | None) -> None:
    """``context.load_cert_chain``, with an error that blames the right file.

    OpenSSL says "PEM lib" or "No such file" without saying which of the two files it means;
    each file is read and looked at first, so that the error names it.
    """
    cert = os.fspath(cert_path)
    cert_pem = _read_pem(cert_path, "certificate")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TLSLoadError(f"the TLS certificate file {cert!r} holds no PEM certificate")
    if key_path is None:
        if b"PRIVATE KEY-----" not in cert_pem:
            raise TLSLoadError(
                f"the TLS certificate file {cert!r} holds no private key: "
                "name the key's file too (--tls-key)"
            )
        key, key_what = cert, "certificate file"
    else:
        key, key_what = os.fspath(key_path), "key file"
        if b"PRIVATE KEY-----" not in _read_pem(key_path, "key"):
            raise TLSLoadError(f"the TLS key file {key!r} holds no PEM private key")
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except TLSLoadError as exc:
        raise TLSLoadError(f"the TLS private key in {key!r} {exc}") from None
    except ssl.SSLError as exc:
        text = str(exc)
        if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
            raise TLSLoadError(
                f"the TLS key in {key!r} does not belong to the certificate in {cert!r}"
            ) from exc
        raise TLSLoadError(
            f"cannot load the TLS certificate {cert!r} with the key in the {key_what} "
            f"{key!r}: {exc.reason or text}"
        ) from exc
    except OSError as exc:  # changed between our read and OpenSSL's
        raise TLSLoadError(f"cannot load the TLS certificate {cert!r}: {exc}") from exc


@attrs.define
class TLSConfig:
    """The server's certificate and handshake policy; :meth:`reload` swaps the certificate."""

    cert_path: StrPath
    key_path: StrPath | None = None
    client_ca_path: StrPath | None = None
    handshake_timeout: float = 30.0
    context: ssl.SSLContext = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # A broken certificate at start-up is an error for the caller (the CLI exits 2):
        # TLSLoadError, whose text names the file at fault.
        self.context = self._load()

    def _load(self) -> ssl.SSLContext:
        return server_context(self.cert_path, self.key_path, self.client_ca_path)

    def reload(self) -> bool:
        """Read the certificate and key again; on failure keep the old ones and log why."""
        try:
            context = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # TLSLoadError names the file at fault; anything else is about the certificate.
            problem = exc if isinstance(exc, TLSLoadError) else f"{self.cert_path}: {exc}"
            log.error("TLS certificate not reloaded, keeping the old one: %s", problem)
            return False
        self.context = context
        log.info("TLS certificate reloaded from %s", self.cert_path)
        return True

    async def handshake(self, stream: AnyByteStream) -> TLSStream:
        """The server side of a handshake on ``stream``, bounded by ``handshake_timeout``.

        Raises :class:`TLSHandshakeFailed` for anything that goes wrong: a stall, a client
        that hangs up, plaintext or garbage where a ClientHello should be.
        """
        try:
            with anyio.fail_after(self.handshake_timeout):
                # standard_compatible=False: SMTP ends with QUIT, and many clients drop the
                # connection without a TLS close_notify; that is no error here.
                return await TLSStream.wrap(
                    stream, server_side=True, ssl_context=self.context, standard_compatible=False
                )
        except TimeoutError:
            raise TLSHandshakeFailed(f"timed out after {self.handshake_timeout:g} s") from None
        except ssl.SSLError as exc:
            raise TLSHandshakeFailed(exc.reason or str(exc)) from None
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise TLSHandshakeFailed(f"connection lost ({type(exc).__name__})") from None


class TLSHandshakeFailed(Exception):
    """The TLS handshake did not complete; the text says why, in a few words."""


def tls_info(tls: ssl.SSLObject | ssl.SSLSocket) -> TLSInfo:
    """What the handshake negotiated, for ``Session.tls`` (from a TLS stream's ``ssl_object``,
    or an asyncio transport's)."""
    certificate = tls.getpeercert()
    subject = None
    if certificate and "subject" in certificate:
        # RFC 4514 writes the most specific name first, the reverse of the certificate.
        subject = ",".join(
            f"{_SHORT_NAMES.get(name, name)}={value}"
            for rdn in reversed(certificate["subject"])
            for name, value in rdn
        )
    cipher = tls.cipher()
    return TLSInfo(
        version=tls.version() or "",
        cipher=cipher[0] if cipher else "",
        peer_certificate_subject=subject,
    )
