"""Choosing and performing RFB security: what the client offers, accepts and computes.

This module decides which security type (and VeNCrypt subtype) to use given what
the server offers and what the caller allowed, and computes the VNC Authentication
response. It performs no I/O; the connection drives the exchange and `tls` sets
up the TLS layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from resourced.errors import AuthenticationFailed, SecurityNegotiationFailed
from resourced.rfb.constants import SecurityType, VeNCryptSubtype
from resourced.rfb.text import credential_bytes

VNC_AUTH_CHALLENGE_SIZE = 16


class TlsMode(enum.Enum):
    """What the caller demands of transport security."""

    #: Use verified TLS when the server offers it, else anything the server offers.
    AUTO = "auto"
    #: Only X.509 VeNCrypt subtypes, with the server certificate verified.
    REQUIRE = "require"
    #: Never TLS (for servers whose TLS we cannot use); still refuses nothing else.
    NEVER = "never"


class Inner(enum.Enum):
    """The authentication performed inside (or without) TLS."""

    NONE = "none"
    VNC = "vnc"
    PLAIN = "plain"
    SASL = "sasl"


@dataclass(frozen=True, slots=True)
class SubtypeInfo:
    tls: bool  # wrapped in TLS at all
    x509: bool  # TLS with certificates (verifiable), else anonymous Diffie-Hellman
    inner: Inner


VENCRYPT_SUBTYPES: dict[VeNCryptSubtype, SubtypeInfo] = {
    VeNCryptSubtype.PLAIN: SubtypeInfo(False, False, Inner.PLAIN),
    VeNCryptSubtype.TLS_NONE: SubtypeInfo(True, False, Inner.NONE),
    VeNCryptSubtype.TLS_VNC: SubtypeInfo(True, False, Inner.VNC),
    VeNCryptSubtype.TLS_PLAIN: SubtypeInfo(True, False, Inner.PLAIN),
    VeNCryptSubtype.X509_NONE: SubtypeInfo(True, True, Inner.NONE),
    VeNCryptSubtype.X509_VNC: SubtypeInfo(True, True, Inner.VNC),
    VeNCryptSubtype.X509_PLAIN: SubtypeInfo(True, True, Inner.PLAIN),
    VeNCryptSubtype.X509_SASL: SubtypeInfo(True, True, Inner.SASL),
    VeNCryptSubtype.TLS_SASL: SubtypeInfo(True, False, Inner.SASL),
}


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the caller can authenticate with."""

    password: str | None = None
    username: str | None = None

    def can(self, inner: Inner) -> bool:
        if inner is Inner.NONE:
            return True
        if inner is Inner.VNC:
            return self.password is not None
        if inner is Inner.PLAIN:
            return self.password is not None and self.username is not None
        return False  # SASL is not implemented yet


def _subtype_rank(info: SubtypeInfo) -> int:
    # Prefer certificates over anonymous TLS over nothing; within each, stronger
    # inner authentication first (a server that offers it wants it).
    tls_rank = 2 if info.x509 else (1 if info.tls else 0)
    inner_rank = {Inner.PLAIN: 2, Inner.VNC: 1, Inner.NONE: 0, Inner.SASL: -1}[info.inner]
    return tls_rank * 10 + inner_rank


def choose_security_type(
    offered: list[int], mode: TlsMode, credentials: Credentials, allow_anonymous_tls: bool
) -> SecurityType:
    """Pick the top-level security type from the server's list (rfbproto 7.1.2)."""
    known = {t for t in offered if t in SecurityType._value2member_map_}
    if mode is not TlsMode.NEVER and SecurityType.VENCRYPT in known:
        return SecurityType.VENCRYPT
    if mode is TlsMode.REQUIRE:
        raise SecurityNegotiationFailed(
            f"TLS was required but the server offers no VeNCrypt (offered: {_names(offered)})"
        )
    if SecurityType.VNC_AUTH in known:
        if credentials.password is None:
            if SecurityType.NONE in known:
                return SecurityType.NONE
            raise AuthenticationFailed("the server requires a VNC password and none was given")
        return SecurityType.VNC_AUTH
    if SecurityType.NONE in known:
        return SecurityType.NONE
    if SecurityType.SASL in known:
        raise SecurityNegotiationFailed("the server offers only SASL, which is not supported yet")
    raise SecurityNegotiationFailed(f"no supported security type offered: {_names(offered)}")


def choose_vencrypt_subtype(
    offered: list[int], mode: TlsMode, credentials: Credentials, allow_anonymous_tls: bool
) -> VeNCryptSubtype:
    """Pick a VeNCrypt subtype (rfbproto 7.2.19), never silently weaker than asked."""
    candidates: list[tuple[int, VeNCryptSubtype]] = []
    refused: list[str] = []
    for number in offered:
        if number not in VeNCryptSubtype._value2member_map_:
            continue
        subtype = VeNCryptSubtype(number)
        info = VENCRYPT_SUBTYPES[subtype]
        if info.inner is Inner.SASL:
            refused.append(f"{subtype.name} (SASL is not supported yet)")
        elif mode is TlsMode.REQUIRE and not info.x509 and not (info.tls and allow_anonymous_tls):
            refused.append(f"{subtype.name} (not certificate-verified TLS)")
        elif mode is TlsMode.NEVER and info.tls:
            refused.append(f"{subtype.name} (TLS disabled)")
        elif not info.tls and info.inner is Inner.PLAIN:
            refused.append(f"{subtype.name} (would send the password unencrypted)")
        elif not credentials.can(info.inner):
            refused.append(f"{subtype.name} (needs a {info.inner.value} credential we lack)")
        else:
            candidates.append((_subtype_rank(info), subtype))
    if not candidates:
        offered_names = _vencrypt_names(offered)
        detail = "; ".join(refused) if refused else "none known"
        if any("credential" in r for r in refused):
            raise AuthenticationFailed(
                f"missing credentials for every VeNCrypt subtype offered ({offered_names}): "
                f"{detail}"
            )
        raise SecurityNegotiationFailed(
            f"no acceptable VeNCrypt subtype among {offered_names}: {detail}"
        )
    candidates.sort(reverse=True)
    return candidates[0][1]


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """The VNC Authentication response (rfbproto 7.2.2): DES of the challenge.

    The key is the first 8 bytes of the password's UTF-8 (NUL padded), as QEMU
    and gtk-vnc take it (see `resourced.rfb.text`), with the bits of each byte
    reversed, as the original VNC implementation did. Single DES is expressed
    as three-key DES with one key repeated, which is the same cipher.
    """
    if len(challenge) != VNC_AUTH_CHALLENGE_SIZE:
        raise ValueError("the VNC challenge is 16 bytes")
    # Imported here: loading cryptography costs every start of a client (the
    # service's activation) time that only a VNC-password server needs.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    raw = credential_bytes(password)[:8].ljust(8, b"\0")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in raw)
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def _names(types: list[int]) -> str:
    names = []
    for t in types:
        names.append(SecurityType(t).name if t in SecurityType._value2member_map_ else str(t))
    return ", ".join(names) or "nothing"


def _vencrypt_names(types: list[int]) -> str:
    names = []
    for t in types:
        known = t in VeNCryptSubtype._value2member_map_
        names.append(VeNCryptSubtype(t).name if known else str(t))
    return ", ".join(names) or "nothing"
