"""A throw-away X.509 PKI for tests: a CA, a server and a client, plus a stranger.

`make_pki()` writes QEMU's x509 directory layout for the server
(`ca-cert.pem`, `server-cert.pem`, `server-key.pem`) and the client side
(`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), and a second, unrelated
CA with its own client certificate for "wrong CA" tests. Keys are EC P-256,
which QEMU's gnutls and Python's ssl both accept.

Test-only: keys are written unencrypted and live for 30 days. Not for anything
but tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    """Paths of everything `make_pki` wrote."""

    server_dir: Path
    """QEMU `tls-creds-x509` dir for endpoint=server."""
    client_dir: Path
    """QEMU-style client dir: ca-cert.pem, client-cert.pem, client-key.pem."""
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    """A CA that signed nothing the server or client trust."""
    other_ca_key: Path
    other_client_cert: Path
    """A client certificate signed by the other CA: rejected by a verifying server."""
    other_client_key: Path


@dataclass(frozen=True)
class _Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: x509.Name,
    issuer: _Issuer,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # A day back so a clock a little behind (or a host in another zone
        # reading a naive time) does not find the certificate not yet valid.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )


def _make_ca(common_name: str, now: datetime.datetime) -> tuple[_Issuer, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer = _Issuer(name, key)
    cert = (
        _builder(name, issuer, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return issuer, cert


def _make_leaf(
    common_name: str,
    issuer: _Issuer,
    now: datetime.datetime,
    purpose: x509.ObjectIdentifier,
    alt_names: Sequence[x509.GeneralName] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, issuer, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # keyEncipherment means nothing for an EC key, but QEMU's sanity
            # check and older gnutls expect it beside digitalSignature.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(alt_names)), critical=False
        )
    return key, builder.sign(issuer.key, hashes.SHA256())


def make_pki(
    directory: Path,
    *,
    server_names: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1",),
    ca_name: str = "resourced test CA",
) -> Pki:
    """Write a fresh CA, server and client certificate set under `directory`.

    Layout: `directory/server/` (QEMU's server dir), `directory/client/`
    (client files plus `other-client-cert.pem`/`other-client-key.pem` signed by
    the other CA), and `directory/other-ca-cert.pem`/`other-ca-key.pem`.
    """
    now = datetime.datetime.now(datetime.UTC)
    server_dir = directory / "server"
    client_dir = directory / "client"
    server_dir.mkdir(parents=True, exist_ok=True)
    client_dir.mkdir(parents=True, exist_ok=True)

    ca, ca_cert = _make_ca(ca_name, now)
    other_ca, other_ca_cert = _make_ca(f"{ca_name} (unrelated)", now)

    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in server_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
    server_cn = server_names[0] if server_names else "resourced test server"
    server_key, server_cert = _make_leaf(
        server_cn, ca, now, ExtendedKeyUsageOID.SERVER_AUTH, alt_names
    )
    client_key, client_cert = _make_leaf(
        "resourced test client", ca, now, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    other_client_key, other_client_cert = _make_leaf(
        "resourced stranger client", other_ca, now, ExtendedKeyUsageOID.CLIENT_AUTH
    )

    pki = Pki(
        server_dir=server_dir,
        client_dir=client_dir,
        ca_cert=directory / "ca-cert.pem",
        ca_key=directory / "ca-key.pem",
        server_cert=server_dir / "server-cert.pem",
        server_key=server_dir / "server-key.pem",
        client_cert=client_dir / "client-cert.pem",
        client_key=client_dir / "client-key.pem",
        other_ca_cert=directory / "other-ca-cert.pem",
        other_ca_key=directory / "other-ca-key.pem",
        other_client_cert=client_dir / "other-client-cert.pem",
        other_client_key=client_dir / "other-client-key.pem",
    )
    for path in (pki.ca_cert, server_dir / "ca-cert.pem", client_dir / "ca-cert.pem"):
        _write_cert(path, ca_cert)
    _write_key(pki.ca_key, ca.key)
    _write_cert(pki.server_cert, server_cert)
    _write_key(pki.server_key, server_key)
    _write_cert(pki.client_cert, client_cert)
    _write_key(pki.client_key, client_key)
    _write_cert(pki.other_ca_cert, other_ca_cert)
    _write_key(pki.other_ca_key, other_ca.key)
    _write_cert(pki.other_client_cert, other_client_cert)
    _write_key(pki.other_client_key, other_client_key)
    return pki
