"""The relay's TLS: its own key and self-signed certificate, or a certificate from a
public authority (``--tls-cert``/``--tls-key``), reloaded on SIGHUP.

Own key (the default): on first start the relay makes a P-256 key (``tls.key``, mode 0600)
and a self-signed certificate for it (``tls.crt``) in its data directory, and keeps both.
Nodes do not check the certificate's name, dates or issuer: they check that its public key
hashes to the pin in the relay's address (keyvault.pins), which the relay prints at start.

Public certificate: the files given are read at start and again on ``reload`` (SIGHUP);
nodes check them against the system's CA store and the host name, as a browser does, and
the address carries no pin.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyvault.pins import certificate_pin

KEY_FILE = "tls.key"
CERT_FILE = "tls.crt"
CERT_YEARS = 100  # nodes pin the key and ignore the dates; a renewal would change nothing


class TlsError(Exception):
    """The TLS key or certificate cannot be used (one line, for the operator)."""


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.unlink()  # a leftover of a crash (or a planted file or link): never written through
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_own_certificate(data_dir: Path) -> tuple[Path, Path]:
    """The relay's own key and certificate, made on first use; (cert, key) paths."""
    key_path, cert_path = data_dir / KEY_FILE, data_dir / CERT_FILE
    if key_path.exists() and cert_path.exists():
        if key_path.stat().st_mode & 0o077:
            raise TlsError(f"{key_path} is readable by other users: chmod 600 it")
        return cert_path, key_path
    if key_path.exists() or cert_path.exists():
        missing = cert_path if key_path.exists() else key_path
        raise TlsError(f"{missing} is missing (the relay's TLS key and certificate go together)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil relay")])
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CERT_YEARS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def own_pin(data_dir: Path) -> str | None:
    """The pin of the relay's own certificate, if it has made one (read-only: a running
    relay's directory can be read by `veil relay invite`)."""
    try:
        pem = (data_dir / CERT_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TlsError(f"cannot read {data_dir / CERT_FILE}: {exc.strerror}") from None
    return _pin_of_pem(pem, data_dir / CERT_FILE)


def _pin_of_pem(pem: bytes, path: Path) -> str:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate") from None
    return certificate_pin(cert.public_bytes(serialization.Encoding.DER))


def _no_passphrase() -> bytes:
    raise TlsError("encrypted")


class RelayTls:
    """The server side of the relay's TLS, its certificate reloadable.

    ``context`` is what the listeners hold; each handshake is moved (in its SNI callback,
    which OpenSSL calls with or without SNI) to the context of the certificate loaded
    last. A reload builds and checks a whole new context first, so one whose files do not
    fit together changes nothing."""

    def __init__(self, data_dir: Path, cert: Path | None = None, key: Path | None = None) -> None:
        if (cert is None) != (key is None):
            raise TlsError("--tls-cert and --tls-key go together")
        self.own = cert is None
        if cert is None or key is None:
            cert, key = ensure_own_certificate(data_dir)
        self.cert, self.key = cert, key
        self.pin: str | None = None
        self.context = self._current = self._load()
        self.context.sni_callback = self._choose

    def _choose(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        sslobj.context = self._current

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            pem = self.cert.read_bytes()
            context.load_cert_chain(self.cert, self.key, password=_no_passphrase)
        except FileNotFoundError as exc:
            raise TlsError(f"cannot read {exc.filename}: no such file") from None
        except PermissionError as exc:
            raise TlsError(f"cannot read {exc.filename}: permission denied") from None
        except TlsError:
            raise TlsError(f"{self.key} is encrypted: give the relay an unencrypted key (mode 0600)") from None
        except ssl.SSLError:
            raise TlsError(
                f"{self.cert} and {self.key} are not a PEM certificate (chain) and the private key that goes with it"
            ) from None
        pin = _pin_of_pem(pem, self.cert)
        self.pin = pin if self.own else None
        return context

    def reload(self) -> None:
        """Read the certificate and key again: new connections get them, open ones keep
        theirs. TlsError, and the old ones stay in use, if the files are not usable."""
        self._current = self._load()
