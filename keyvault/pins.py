"""Key pins: the SHA-256 of a certificate's SubjectPublicKeyInfo (DER), in base32.

A relay address ``wss://HOST:PORT#PIN`` names the relay's public key, not its certificate:
the relay may re-issue its certificate (new dates, new name) with the same key and stay
pinned. Pure: bytes in, text out.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def spki_pin(spki_der: bytes) -> str:
    """The pin of a DER SubjectPublicKeyInfo: base32 (RFC 4648), lower case, no padding."""
    return base64.b32encode(hashlib.sha256(spki_der).digest()).decode().rstrip("=").lower()


def certificate_pin(cert_der: bytes) -> str:
    """The pin of a DER certificate's public key (ValueError if it is not a certificate)."""
    cert = x509.load_der_x509_certificate(cert_der)
    return spki_pin(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
