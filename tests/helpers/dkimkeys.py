"""DKIM keys made in the tests: an RSA or Ed25519 key pair and its DNS TXT record."""

from __future__ import annotations

import base64

import attrs


@attrs.frozen
class DKIMKey:
    private: bytes  # what dkimpy's sign() takes
    record: str  # the TXT record of the public key (RFC 6376 3.6.1)
    algorithm: bytes

    def sign(self, message: bytes, domain: str, selector: str = "sel", **options: object) -> bytes:
        """``message`` with a DKIM-Signature in front."""
        import dkim

        signature = dkim.sign(
            message,
            selector.encode(),
            domain.encode(),
            self.private,
            signature_algorithm=self.algorithm,
            **options,
        )
        return bytes(signature) + message


def rsa_key(bits: int = 1024) -> DKIMKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DKIMKey(private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}", b"rsa-sha256")


def ed25519_key() -> DKIMKey:
    import nacl.encoding
    import nacl.signing

    key = nacl.signing.SigningKey.generate()
    private = key.encode(encoder=nacl.encoding.Base64Encoder)
    public = key.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return DKIMKey(private, f"v=DKIM1; k=ed25519; p={public}", b"ed25519-sha256")
