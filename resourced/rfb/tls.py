"""TLS for VeNCrypt: credentials, where to find them, and a sans-IO TLS layer.

`TlsCredentials` says which CA, client certificate and CRL to use; `discover()`
finds them where gtk-vnc's users (virt-manager, virt-viewer) keep them.
`TlsLayer` wraps `ssl.SSLObject` over memory BIOs: ciphertext in and out as bytes,
no sockets, so the RFB core stays sans-IO. The server certificate is verified
unless the caller turns verification off explicitly. `server_context()` makes the
server side's context (the gateway's), shaped like QEMU's TLS where a viewer could
tell the difference.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from resourced.errors import ConfigurationError, TlsError

#: The client names gtk-vnc is given, whose folders hold a client certificate:
#: virt-manager's (`libvirt-vnc`), then virt-viewer's and remote-viewer's (`libvirt`).
CLIENT_NAMES = ("libvirt-vnc", "libvirt")


def pki_dirs(home: Path | None = None) -> list[Path]:
    """The folders searched, in order: `/etc/pki`, then `~/.pki`.

    `~` is `$HOME`, and also the home folder in the password database when that
    differs (gtk-vnc looks only there). `home` replaces both.
    """
    homes: list[Path] = []
    if home is not None:
        homes.append(home)
    else:
        if os.environ.get("HOME"):
            homes.append(Path(os.environ["HOME"]))
        with contextlib.suppress(KeyError):  # a uid with no entry: $HOME alone
            homes.append(Path(pwd.getpwuid(os.getuid()).pw_dir))
    dirs = [Path("/etc/pki")]
    for folder in homes:
        if folder / ".pki" not in dirs:
            dirs.append(folder / ".pki")
    return dirs


def _first_existing(dirs: list[Path], relative: str) -> Path | None:
    for directory in dirs:
        candidate = directory / relative
        if candidate.exists():
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class TlsCredentials:
    """Certificates for an X.509 VeNCrypt session.

    `ca_file` None with `verify` True means the system's default CA store.
    `server_name` is checked against the certificate when given (TCP connections
    default it to the host name); over a Unix socket or a passed fd there is no
    name to check unless the caller gives one, but the chain is still verified.
    """

    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    crl_file: Path | None = None
    server_name: str | None = None
    verify: bool = True

    @classmethod
    def discover(
        cls,
        client_names: tuple[str, ...] = CLIENT_NAMES,
        home: Path | None = None,
        dirs: list[Path] | None = None,
    ) -> TlsCredentials:
        """Find credentials where gtk-vnc's users keep them (`pki_dirs()`: `/etc/pki`,
        then `~/.pki`).

        CA: `<dir>/CA/cacert.pem`; CRL: `<dir>/CA/cacrl.pem`; each from the first
        folder that has it. Client certificate: `<dir>/<name>/clientcert.pem` for
        each folder, each of `client_names` in turn (virt-manager's `libvirt-vnc`,
        then virt-viewer's `libvirt`); its key is `private/clientkey.pem` beside
        it, never from another folder. `dirs` replaces the folders searched.
        """
        if dirs is None:
            dirs = pki_dirs(home)
        client_cert = client_key = None
        for directory in dirs:
            for name in client_names:
                cert = directory / name / "clientcert.pem"
                if cert.exists():
                    client_cert = cert
                    key = directory / name / "private" / "clientkey.pem"
                    # A certificate without its key is reported when the context is made.
                    client_key = key if key.exists() else None
                    break
            if client_cert is not None:
                break
        return cls(
            ca_file=_first_existing(dirs, "CA/cacert.pem"),
            crl_file=_first_existing(dirs, "CA/cacrl.pem"),
            client_cert=client_cert,
            client_key=client_key,
        )

    def with_server_name(self, name: str | None) -> TlsCredentials:
        if self.server_name is not None or name is None:
            return self
        return TlsCredentials(
            self.ca_file, self.client_cert, self.client_key, self.crl_file, name, self.verify
        )

    def describe(self) -> str:
        ca = str(self.ca_file) if self.ca_file else "the system CA store"
        return f"CA {ca}" + (f", client certificate {self.client_cert}" if self.client_cert else "")

    def make_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.verify:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = self.server_name is not None
            try:
                if self.ca_file is not None:
                    ctx.load_verify_locations(cafile=str(self.ca_file))
                else:
                    ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
                if self.crl_file is not None:
                    ctx.load_verify_locations(cafile=str(self.crl_file))
                    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            except (OSError, ssl.SSLError) as err:
                raise ConfigurationError(f"cannot load CA/CRL for TLS: {err}") from err
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if (self.client_cert is None) != (self.client_key is None):
            raise ConfigurationError("a client certificate needs its key and vice versa")
        if self.client_cert is not None and self.client_key is not None:
            try:
                ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
            except (OSError, ssl.SSLError) as err:
                raise ConfigurationError(f"cannot load the client certificate: {err}") from err
        return ctx


def disable_session_tickets(context: ssl.SSLContext) -> None:
    """Make a server context issue no session tickets, as QEMU's VNC server issues none.

    A VNC session is never resumed, so a ticket is only bytes the viewer must
    cope with; and TLS 1.3 sends them after the handshake, in the same burst as
    the first VNC bytes inside TLS, which TigerVNC 1.12 mishandles (it waits for
    the VNC challenge forever). `num_tickets = 0` stops TLS 1.3's;
    `OP_NO_TICKET` stops TLS 1.2's (on its own it only makes OpenSSL's TLS 1.3
    tickets stateful, still sent).
    """
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET


def server_context(cert_file: Path, key_file: Path, ca_file: Path | None = None) -> ssl.SSLContext:
    """A TLS server context for VeNCrypt X509*: our certificate, and with `ca_file`
    a required client certificate that chains to it.

    TLS 1.2 and 1.3 only (QEMU's gnutls default would also take 1.0 and 1.1, which
    no maintained viewer needs), no session tickets (`disable_session_tickets`).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    disable_session_tickets(context)
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as err:
        raise ConfigurationError(
            f"cannot load the TLS certificate {cert_file} with key {key_file}: {_reason(err)}"
        ) from err
    if ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as err:
            raise ConfigurationError(
                f"cannot load the CA certificate {ca_file}: {_reason(err)}"
            ) from err
    return context


def _reason(err: OSError) -> str:
    """An error's reason without the file name (the caller names it) or CPython's
    source line ("[SSL] PEM lib (_ssl.c:3905)")."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", err.strerror or str(err))


def anonymous_context() -> ssl.SSLContext:
    """A context for VeNCrypt's anonymous Diffie-Hellman subtypes (TLSNone/Vnc/Plain).

    Anonymous TLS encrypts but authenticates nobody; TLS 1.3 has no anonymous
    suites, so this is TLS 1.2 with OpenSSL's security level lowered to allow them.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.set_ciphers("aNULL:!eNULL:@SECLEVEL=0")
    except ssl.SSLError as err:
        raise TlsError(f"this OpenSSL offers no anonymous TLS ciphers: {err}") from err
    return ctx


def read_available(obj: ssl.SSLObject, *, eof_ends_stream: bool) -> tuple[bytes, bool]:
    """All plaintext an SSLObject can give now, and whether the peer has sent its
    close_notify (both sides of VeNCrypt use it).

    `eof_ends_stream`: treat a transport EOF without close_notify as the end of
    the stream rather than an error (RFB messages are self-delimiting, so a cut
    inside a message is still caught above).
    """
    chunks = []
    closed = False
    while True:
        try:
            chunk = obj.read(65536)
        except ssl.SSLWantReadError:
            break
        except ssl.SSLZeroReturnError:
            closed = True
            break
        except ssl.SSLEOFError as err:
            if eof_ends_stream:
                break
            raise TlsError(f"TLS error: {err.reason or err}") from err
        except ssl.SSLError as err:
            raise TlsError(f"TLS error: {err.reason or err}") from err
        if not chunk:
            closed = True
            break
        chunks.append(chunk)
    return b"".join(chunks), closed


class TlsLayer:
    """A TLS client session over memory buffers (no I/O).

    `receive(ciphertext)` returns decrypted plaintext; `send(plaintext)` queues;
    `data_to_send()` returns ciphertext for the wire. Errors become `TlsError`.
    """

    def __init__(self, context: ssl.SSLContext, server_name: str | None, describe: str) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._describe = describe
        self._obj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_name
        )
        self.handshake_done = False
        #: The server sent its close_notify: the stream has ended.
        self.peer_closed = False
        self._pending_plaintext = bytearray()
        self._eof = False
        self._step()

    @property
    def version(self) -> str | None:
        return self._obj.version()

    @property
    def cipher(self) -> str | None:
        info = self._obj.cipher()
        return info[0] if info else None

    def _step(self) -> None:
        if self.handshake_done:
            return
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLCertVerificationError as err:
            raise TlsError(
                f"the server's TLS certificate is not trusted ({err.verify_message}; "
                f"checked against {self._describe})"
            ) from err
        except ssl.SSLError as err:
            raise TlsError(f"TLS handshake failed: {err.reason or err}") from err
        self.handshake_done = True
        if self._pending_plaintext:
            self.send(bytes(self._pending_plaintext))
            self._pending_plaintext.clear()

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext (b"" = transport EOF); return whatever plaintext it yields."""
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
            self._eof = True
        self._step()
        if not self.handshake_done:
            if self._eof:
                raise TlsError("the server closed the connection during the TLS handshake")
            return b""
        plaintext, closed = read_available(self._obj, eof_ends_stream=False)
        self.peer_closed = self.peer_closed or closed
        return plaintext

    def send(self, plaintext: bytes) -> None:
        if not self.handshake_done:
            self._pending_plaintext += plaintext
            return
        try:
            self._obj.write(plaintext)
        except ssl.SSLError as err:
            raise TlsError(f"TLS error while sending: {err.reason or err}") from err

    def data_to_send(self) -> bytes:
        return self._outgoing.read()
