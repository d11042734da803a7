"""Security choices and the VNC authentication response (`resourced.rfb.security`)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resourced.errors import AuthenticationFailed, ConfigurationError, SecurityNegotiationFailed
from resourced.rfb.constants import SecurityType, VeNCryptSubtype
from resourced.rfb.security import (
    VENCRYPT_SUBTYPES,
    VNC_AUTH_CHALLENGE_SIZE,
    Credentials,
    Inner,
    TlsMode,
    choose_security_type,
    choose_vencrypt_subtype,
    vnc_auth_response,
)
from resourced.rfb.tls import TlsCredentials, pki_dirs

T = SecurityType
S = VeNCryptSubtype
AUTO, REQUIRE, NEVER = TlsMode.AUTO, TlsMode.REQUIRE, TlsMode.NEVER
NOBODY = Credentials()
PW = Credentials(password="pw")
USER_PW = Credentials(password="pw", username="user")


# ---------------------------------------------------------------------------
# Top-level security type
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "mode", "creds", "expected"),
    [
        ([1], AUTO, NOBODY, T.NONE),
        ([1], AUTO, PW, T.NONE),
        ([2], AUTO, PW, T.VNC_AUTH),
        ([1, 2], AUTO, NOBODY, T.NONE),  # no password: None rather than failing
        ([1, 2], AUTO, PW, T.VNC_AUTH),  # a password: the server wants it used
        ([2, 1], AUTO, PW, T.VNC_AUTH),
        ([1, 2, 19], AUTO, PW, T.VENCRYPT),
        ([19, 1], AUTO, NOBODY, T.VENCRYPT),
        ([19], REQUIRE, NOBODY, T.VENCRYPT),
        ([1, 2, 19], REQUIRE, PW, T.VENCRYPT),
        ([1, 2, 19], NEVER, PW, T.VNC_AUTH),
        ([19, 1], NEVER, NOBODY, T.NONE),
        ([16, 5, 1], AUTO, NOBODY, T.NONE),  # unknown-to-us types are ignored
        ([250, 2], AUTO, PW, T.VNC_AUTH),  # numbers outside the enum too
        ([20, 1], AUTO, NOBODY, T.NONE),  # SASL skipped when something else works
    ],
)
def test_choose_security_type(
    offered: list[int], mode: TlsMode, creds: Credentials, expected: SecurityType
) -> None:
    assert choose_security_type(offered, mode, creds, False) is expected


@pytest.mark.parametrize(
    ("offered", "mode", "creds", "error", "match"),
    [
        ([2], AUTO, NOBODY, AuthenticationFailed, "requires a VNC password"),
        ([1], REQUIRE, NOBODY, SecurityNegotiationFailed, "TLS was required"),
        ([1, 2], REQUIRE, PW, SecurityNegotiationFailed, r"offered: NONE, VNC_AUTH"),
        ([19], NEVER, PW, SecurityNegotiationFailed, "VENCRYPT"),
        ([20], AUTO, PW, SecurityNegotiationFailed, "only SASL"),
        ([5, 16, 200], AUTO, PW, SecurityNegotiationFailed, "RA2, TIGHT, 200"),
        ([], AUTO, PW, SecurityNegotiationFailed, "nothing"),
        ([0], AUTO, PW, SecurityNegotiationFailed, "INVALID"),
        ([18], AUTO, PW, SecurityNegotiationFailed, "TLS"),  # the old vino TLS type
    ],
)
def test_choose_security_type_refusals(
    offered: list[int],
    mode: TlsMode,
    creds: Credentials,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        choose_security_type(offered, mode, creds, False)


def test_require_with_anonymous_allowed_still_needs_vencrypt() -> None:
    with pytest.raises(SecurityNegotiationFailed):
        choose_security_type([1, 2], REQUIRE, PW, True)


# ---------------------------------------------------------------------------
# VeNCrypt subtype
# ---------------------------------------------------------------------------

ALL_SUBTYPES = [256, 257, 258, 259, 260, 261, 262, 263, 264]


@pytest.mark.parametrize(
    ("offered", "mode", "creds", "anon", "expected"),
    [
        # Certificates beat anonymous TLS beat nothing; within each, the
        # strongest inner authentication we can do.
        (ALL_SUBTYPES, AUTO, USER_PW, False, S.X509_PLAIN),
        (ALL_SUBTYPES, AUTO, PW, False, S.X509_VNC),
        (ALL_SUBTYPES, AUTO, NOBODY, False, S.X509_NONE),
        ([257, 258, 259], AUTO, USER_PW, False, S.TLS_PLAIN),
        ([257, 258, 259], AUTO, PW, False, S.TLS_VNC),
        ([257, 258, 259], AUTO, NOBODY, False, S.TLS_NONE),
        ([256, 257], AUTO, USER_PW, False, S.TLS_NONE),  # never Plain in the clear
        ([261, 257], AUTO, PW, False, S.X509_VNC),  # order of the offer is irrelevant
        ([257, 261], AUTO, PW, False, S.X509_VNC),
        ([258, 260], AUTO, PW, False, S.X509_NONE),  # certificates over a password
        # REQUIRE: certificates only, unless anonymous TLS is allowed explicitly.
        (ALL_SUBTYPES, REQUIRE, PW, False, S.X509_VNC),
        ([257, 260], REQUIRE, NOBODY, False, S.X509_NONE),
        ([257, 258], REQUIRE, PW, True, S.TLS_VNC),
        ([257, 260], REQUIRE, NOBODY, True, S.X509_NONE),
        # Unknown subtype numbers are ignored.
        ([7, 1000, 260], AUTO, NOBODY, False, S.X509_NONE),
    ],
)
def test_choose_vencrypt_subtype(
    offered: list[int],
    mode: TlsMode,
    creds: Credentials,
    anon: bool,
    expected: VeNCryptSubtype,
) -> None:
    assert choose_vencrypt_subtype(offered, mode, creds, anon) is expected


@pytest.mark.parametrize(
    ("offered", "mode", "creds", "anon", "error", "match"),
    [
        ([256], AUTO, USER_PW, False, SecurityNegotiationFailed, "password unencrypted"),
        ([263], AUTO, USER_PW, False, SecurityNegotiationFailed, "X509_SASL .SASL is not"),
        ([264], AUTO, USER_PW, False, SecurityNegotiationFailed, "TLS_SASL .SASL is not"),
        ([257, 258], REQUIRE, PW, False, SecurityNegotiationFailed, "not certificate-verified"),
        ([260, 261, 257], NEVER, PW, False, SecurityNegotiationFailed, "TLS disabled"),
        ([261], AUTO, NOBODY, False, AuthenticationFailed, "needs a vnc credential"),
        ([262, 259], AUTO, PW, False, AuthenticationFailed, "needs a plain credential"),
        ([1, 2, 3], AUTO, PW, False, SecurityNegotiationFailed, "none known"),
        ([], AUTO, PW, False, SecurityNegotiationFailed, "among nothing"),
    ],
)
def test_choose_vencrypt_subtype_refusals(
    offered: list[int],
    mode: TlsMode,
    creds: Credentials,
    anon: bool,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        choose_vencrypt_subtype(offered, mode, creds, anon)


def test_never_mode_allows_vencrypt_plain_only_when_not_plain() -> None:
    # NEVER refuses TLS; VeNCrypt without TLS is only Plain, which sends the
    # password in the clear: nothing is left.
    with pytest.raises(SecurityNegotiationFailed):
        choose_vencrypt_subtype([256], NEVER, USER_PW, False)


def test_qemu_numbering_of_sasl_subtypes() -> None:
    # QEMU's ui/vnc.h: 263 is X509SASL, 264 TLSSASL (the reverse of rfbproto).
    assert S(263) is S.X509_SASL
    assert S(264) is S.TLS_SASL
    assert VENCRYPT_SUBTYPES[S(263)].x509
    assert VENCRYPT_SUBTYPES[S(263)].tls
    assert not VENCRYPT_SUBTYPES[S(264)].x509
    assert VENCRYPT_SUBTYPES[S(264)].tls
    assert VENCRYPT_SUBTYPES[S(263)].inner is Inner.SASL
    assert VENCRYPT_SUBTYPES[S(264)].inner is Inner.SASL


@pytest.mark.parametrize(
    ("number", "tls", "x509", "inner"),
    [
        (256, False, False, Inner.PLAIN),
        (257, True, False, Inner.NONE),
        (258, True, False, Inner.VNC),
        (259, True, False, Inner.PLAIN),
        (260, True, True, Inner.NONE),
        (261, True, True, Inner.VNC),
        (262, True, True, Inner.PLAIN),
    ],
)
def test_vencrypt_subtype_table(number: int, tls: bool, x509: bool, inner: Inner) -> None:
    info = VENCRYPT_SUBTYPES[S(number)]
    assert (info.tls, info.x509, info.inner) == (tls, x509, inner)


def test_every_subtype_is_described() -> None:
    assert set(VENCRYPT_SUBTYPES) == set(S)


@pytest.mark.parametrize(
    ("creds", "inner", "can"),
    [
        (NOBODY, Inner.NONE, True),
        (NOBODY, Inner.VNC, False),
        (PW, Inner.VNC, True),
        (PW, Inner.PLAIN, False),
        (Credentials(username="u"), Inner.PLAIN, False),
        (USER_PW, Inner.PLAIN, True),
        (USER_PW, Inner.SASL, False),
        (Credentials(password=""), Inner.VNC, True),  # an empty password is a password
    ],
)
def test_credentials_can(creds: Credentials, inner: Inner, can: bool) -> None:
    assert creds.can(inner) is can


# ---------------------------------------------------------------------------
# VNC authentication response
# ---------------------------------------------------------------------------


def reverse_bits(byte: int) -> int:
    out = 0
    for bit in range(8):
        out = (out << 1) | ((byte >> bit) & 1)
    return out


def test_vnc_auth_response_known_vector() -> None:
    # DES key 0123456789ABCDEF encrypts "Now is t" to 3FA40E8A984D4815. VNC uses
    # the password bytes bit-reversed as the key, so the password is the key's
    # bytes reversed back.
    key = bytes.fromhex("0123456789abcdef")
    # DES ignores the key's parity bits (the lowest), which are the password bytes'
    # highest, so clearing those gives an ASCII password with the same key.
    password = bytes(reverse_bits(b) & 0x7F for b in key).decode("ascii")
    assert password.encode() == bytes.fromhex("0044226611553377")
    response = vnc_auth_response(password, b"Now is tNow is t")
    assert response == bytes.fromhex("3fa40e8a984d4815" * 2)


def test_vnc_auth_response_length() -> None:
    assert VNC_AUTH_CHALLENGE_SIZE == 16
    assert len(vnc_auth_response("pw", bytes(16))) == 16
    assert len(vnc_auth_response("", bytes(16))) == 16


@pytest.mark.parametrize("size", [0, 8, 15, 17, 32])
def test_vnc_auth_challenge_must_be_16_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        vnc_auth_response("pw", bytes(size))


def test_vnc_auth_password_truncated_to_8() -> None:
    challenge = bytes(range(16))
    assert vnc_auth_response("abcdefghIJKLMNOP", challenge) == vnc_auth_response(
        "abcdefgh", challenge
    )
    assert vnc_auth_response("abcdefgh", challenge) != vnc_auth_response("abcdefgi", challenge)


def test_vnc_auth_short_password_padded_with_nul() -> None:
    challenge = bytes(range(16))
    assert vnc_auth_response("ab", challenge) == vnc_auth_response("ab\0\0\0\0\0\0", challenge)
    assert vnc_auth_response("", challenge) == vnc_auth_response("\0" * 8, challenge)


def test_vnc_auth_blocks_are_independent() -> None:
    # ECB: each 8-byte half of the challenge is encrypted alone.
    a, b = b"AAAAAAAA", b"BBBBBBBB"
    ab = vnc_auth_response("secret", a + b)
    ba = vnc_auth_response("secret", b + a)
    assert ab[:8] == ba[8:]
    assert ab[8:] == ba[:8]


def test_vnc_auth_only_low_key_bits_matter() -> None:
    # DES ignores each key byte's parity bit, its lowest; after VNC's bit reversal
    # that is the password byte's *highest* bit: bytes 0x61 and 0xe1 agree.
    challenge = bytes(range(16))
    assert vnc_auth_response("a", challenge) != vnc_auth_response("b", challenge)
    # So "é" keyed as its UTF-8 bytes C3 A9 answers like "C)" (43 29), and not
    # like "i" (69), which is what its Latin-1 byte E9 would give.
    assert vnc_auth_response("é", challenge) == vnc_auth_response("C)", challenge)
    assert vnc_auth_response("é", challenge) != vnc_auth_response("i", challenge)


def test_vnc_auth_keys_with_the_first_8_utf8_bytes() -> None:
    """QEMU and gtk-vnc key DES with the first 8 bytes of the password's UTF-8
    (issue #9: Latin-1 made "pässwö" fail against them, and turned anything
    outside Latin-1 into "?")."""
    challenge = bytes(range(16))
    # "pässwö" is 70 C3A4 73 73 77 C3B6: 8 bytes; top bits cleared, "pC$sswC6".
    assert vnc_auth_response("pässwö", challenge) == vnc_auth_response("pC$sswC6", challenge)
    assert vnc_auth_response("pässwö", challenge) == vnc_auth_response("pässwöXYZ", challenge)
    # A character cut by the 8-byte limit counts by the bytes that fit, as in QEMU.
    assert vnc_auth_response("abcdefgé", challenge) == vnc_auth_response("abcdefgC", challenge)
    # Outside Latin-1: no longer all "?".
    assert vnc_auth_response("日本", challenge) != vnc_auth_response("中文", challenge)
    assert vnc_auth_response("日本", challenge) != vnc_auth_response("??", challenge)


ascii_text = st.text(alphabet=st.characters(max_codepoint=127), max_size=20)


@settings(max_examples=200, deadline=None, database=None)
@given(ascii_text, st.text(max_size=5), st.binary(min_size=16, max_size=16))
def test_vnc_auth_depends_on_the_nul_padded_first_8_bytes(
    password: str, tail: str, challenge: bytes
) -> None:
    response = vnc_auth_response(password, challenge)
    assert len(response) == 16
    padded = password[:8].ljust(8, "\0")
    assert vnc_auth_response(padded + tail, challenge) == response


def test_discover_finds_virt_viewer_and_virt_manager_folders(tmp_path: Path) -> None:
    """remote-viewer's `libvirt` folder is found as well as virt-manager's
    `libvirt-vnc`, which comes first in the same folder; system before user; the
    key always from beside its certificate."""
    system, user = tmp_path / "etc-pki", tmp_path / "home/.pki"
    (user / "libvirt/private").mkdir(parents=True)
    (user / "libvirt/clientcert.pem").write_text("cert")
    (user / "libvirt/private/clientkey.pem").write_text("key")
    found = TlsCredentials.discover(dirs=[system, user])
    assert found.client_cert == user / "libvirt/clientcert.pem"
    assert found.client_key == user / "libvirt/private/clientkey.pem"

    (user / "libvirt-vnc/private").mkdir(parents=True)
    (user / "libvirt-vnc/clientcert.pem").write_text("cert")
    (user / "libvirt-vnc/private/clientkey.pem").write_text("key")
    assert TlsCredentials.discover(dirs=[system, user]).client_cert == (
        user / "libvirt-vnc/clientcert.pem"
    )

    # A system certificate wins, and its missing key is not taken from elsewhere.
    (system / "libvirt").mkdir(parents=True)
    (system / "libvirt/clientcert.pem").write_text("cert")
    found = TlsCredentials.discover(dirs=[system, user])
    assert found.client_cert == system / "libvirt/clientcert.pem"
    assert found.client_key is None
    with pytest.raises(ConfigurationError, match="needs its key"):
        found.make_context()


def test_pki_dirs_follow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$HOME's .pki is searched, and the password database's home too (gtk-vnc's)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    passwd_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    dirs = pki_dirs()
    assert dirs[:2] == [Path("/etc/pki"), tmp_path / ".pki"]
    assert dirs[-1] == passwd_home / ".pki"
    monkeypatch.setenv("HOME", str(passwd_home))
    assert pki_dirs() == [Path("/etc/pki"), passwd_home / ".pki"]


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(min_size=8, max_size=20), st.text(max_size=5), st.binary(min_size=16, max_size=16))
def test_vnc_auth_ignores_what_follows_8_utf8_bytes(
    password: str, tail: str, challenge: bytes
) -> None:
    assert vnc_auth_response(password + tail, challenge) == vnc_auth_response(password, challenge)


def test_discover_follows_gtk_vnc_order(tmp_path: Path) -> None:
    """System folder first, then the user's; each file from the first that has it."""
    system, user = tmp_path / "etc-pki", tmp_path / "home/.pki"
    for base in (system, user):
        (base / "CA").mkdir(parents=True)
        (base / "libvirt-vnc/private").mkdir(parents=True)
        (base / "CA/cacert.pem").write_text("ca")
    (user / "CA/cacrl.pem").write_text("crl")
    (user / "libvirt-vnc/clientcert.pem").write_text("cert")
    (user / "libvirt-vnc/private/clientkey.pem").write_text("key")
    found = TlsCredentials.discover(dirs=[system, user])
    assert found.ca_file == system / "CA/cacert.pem"
    assert found.crl_file == user / "CA/cacrl.pem"
    assert found.client_cert == user / "libvirt-vnc/clientcert.pem"
    assert found.client_key == user / "libvirt-vnc/private/clientkey.pem"
    assert pki_dirs(tmp_path / "home") == [Path("/etc/pki"), tmp_path / "home/.pki"]
    other = TlsCredentials.discover(("my-client",), dirs=[system, user])
    assert other.client_cert is None
