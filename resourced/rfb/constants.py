"""Number spaces of the RFB protocol and of QEMU's extensions to it, plus our limits.

Every number the wire carries has an `IntEnum` here whose docstring cites where it
is defined: the RFB community specification (rfbproto `rfbproto.rst`, which extends
RFC 6143) or QEMU's VNC server (`ui/vnc.h`, `ui/vnc.c`). Limits that bound what a
peer can make us allocate are named constants at the end of this module.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class SecurityType(IntEnum):
    """Security types (rfbproto 7.1.2 "Security Handshake", RFC 6143 7.2)."""

    INVALID = 0
    NONE = 1
    VNC_AUTH = 2
    RA2 = 5
    RA2NE = 6
    TIGHT = 16
    ULTRA = 17
    TLS = 18  # the old "vino" TLS type, not VeNCrypt
    VENCRYPT = 19
    SASL = 20
    MS_LOGON = 0xFE  # reused by some servers; only ever refused here


class VeNCryptSubtype(IntEnum):
    """VeNCrypt subtypes (rfbproto 7.2.19 "VeNCrypt").

    QEMU and gtk-vnc assign 263 and 264 the other way round from the spec: QEMU
    (`ui/vnc.h`) calls 263 X509SASL and 264 TLSSASL. We follow QEMU, because that is
    the server we talk to; both mean SASL, which we refuse anyway.
    """

    PLAIN = 256
    TLS_NONE = 257
    TLS_VNC = 258
    TLS_PLAIN = 259
    X509_NONE = 260
    X509_VNC = 261
    X509_PLAIN = 262
    X509_SASL = 263  # spec: TLSSASL; QEMU/gtk-vnc: X509SASL
    TLS_SASL = 264  # spec: X509SASL; QEMU/gtk-vnc: TLSSASL


class SecurityResult(IntEnum):
    """SecurityResult values (rfbproto 7.1.3)."""

    OK = 0
    FAILED = 1
    TOO_MANY_ATTEMPTS = 2  # sent by some servers (TightVNC) in place of FAILED


class ServerMessageType(IntEnum):
    """Server-to-client message types (rfbproto 7.6)."""

    FRAMEBUFFER_UPDATE = 0
    SET_COLOUR_MAP_ENTRIES = 1
    BELL = 2
    SERVER_CUT_TEXT = 3
    END_OF_CONTINUOUS_UPDATES = 150
    SERVER_FENCE = 248
    XVP = 250
    QEMU = 255


class ClientMessageType(IntEnum):
    """Client-to-server message types (rfbproto 7.5)."""

    SET_PIXEL_FORMAT = 0
    SET_ENCODINGS = 2
    FRAMEBUFFER_UPDATE_REQUEST = 3
    KEY_EVENT = 4
    POINTER_EVENT = 5
    CLIENT_CUT_TEXT = 6
    QEMU = 255


class QemuClientSubtype(IntEnum):
    """Submessages of client message 255 (rfbproto 7.5.9 "QEMU Client Message").

    CONSOLE is ours (docs/protocol/console-extension.md), provisional.
    """

    EXTENDED_KEY_EVENT = 0
    AUDIO = 1
    CONSOLE = 2


class QemuServerSubtype(IntEnum):
    """Submessages of server message 255 (rfbproto 7.6.8 "QEMU Server Message").

    CONSOLE is ours (docs/protocol/console-extension.md), provisional.
    """

    AUDIO = 1
    CONSOLE = 2


class QemuAudioClientOp(IntEnum):
    """Operations of the client's QEMU audio message (rfbproto 7.5.9.2)."""

    ENABLE = 0
    DISABLE = 1
    SET_FORMAT = 2


class QemuAudioServerOp(IntEnum):
    """Operations of QEMU's audio server message (rfbproto 7.6.8.1; `ui/vnc.c`).

    QEMU sends 0 when capture stops and 1 when it starts (`audio_capture_notify`).
    """

    END = 0
    BEGIN = 1
    DATA = 2


class AudioSampleFormat(IntEnum):
    """Sample formats of the QEMU audio SetFormat operation (rfbproto 7.5.9.2).

    QEMU sends its samples little-endian whatever the host.
    """

    U8 = 0
    S8 = 1
    U16 = 2
    S16 = 3
    U32 = 4
    S32 = 5

    @property
    def sample_size(self) -> int:
        return {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4}[self.value]

    @property
    def signed(self) -> bool:
        return self.value in (1, 3, 5)


class Encoding(IntEnum):
    """Encodings and pseudo-encodings (rfbproto 7.7, 7.8; QEMU `ui/vnc.h`).

    Values are signed 32-bit, as SetEncodings carries them.
    """

    RAW = 0
    COPY_RECT = 1
    RRE = 2
    CORRE = 4
    HEXTILE = 5
    ZLIB = 6
    TIGHT = 7
    ZLIBHEX = 8
    TRLE = 15
    ZRLE = 16
    ZYWRLE = 17
    # pseudo-encodings
    JPEG_QUALITY_0 = -32  # -32..-23 (rfbproto 7.8.4)
    COMPRESS_LEVEL_0 = -256  # -256..-247 (rfbproto 7.8.5)
    DESKTOP_SIZE = -223
    LAST_RECT = -224
    POINTER_POS = -232
    CURSOR = -239
    X_CURSOR = -240
    QEMU_POINTER_MOTION_CHANGE = -257
    QEMU_EXTENDED_KEY_EVENT = -258
    QEMU_AUDIO = -259
    TIGHT_PNG = -260
    QEMU_LED_STATE = -261
    #: Ours, provisional (docs/protocol/console-extension.md): the first number of
    #: the range rfbproto gives QEMU (-257..-272) that nobody has taken.
    CONSOLES = -262
    EXTENDED_DESKTOP_SIZE = -308
    XVP = -309
    ALPHA_CURSOR = -314
    #: 0xC0A1E5CE as a signed 32-bit number (rfbproto "Extended Clipboard Pseudo-Encoding").
    EXTENDED_CLIPBOARD = -1063131698
    WMVI = 0x574D5669


class ExtendedClipboardFlag(IntFlag):
    """The flags word of an Extended Clipboard message (rfbproto "Extended
    Clipboard Pseudo-Encoding"): formats in the low 16 bits, one action in the top byte."""

    TEXT = 1 << 0
    RTF = 1 << 1
    HTML = 1 << 2
    DIB = 1 << 3
    FILES = 1 << 4
    CAPS = 1 << 24
    REQUEST = 1 << 25
    PEEK = 1 << 26
    NOTIFY = 1 << 27
    PROVIDE = 1 << 28


#: The format bits of `ExtendedClipboardFlag` (the spec reserves bits 0-15 for formats).
EXTENDED_CLIPBOARD_FORMATS = 0xFFFF


class XvpCode(IntEnum):
    """Codes of the xvp messages (rfbproto "xvp Server Message", "xvp Client Message").

    The server sends FAIL and INIT; the client sends SHUTDOWN, REBOOT and RESET.
    """

    FAIL = 0
    INIT = 1
    SHUTDOWN = 2
    REBOOT = 3
    RESET = 4


#: The only xvp version there is (rfbproto); QEMU drops a client that sends another.
XVP_VERSION = 1


#: Encodings whose rectangles carry pixels and so must lie inside the framebuffer.
PIXEL_ENCODINGS = frozenset(
    {
        Encoding.RAW,
        Encoding.COPY_RECT,
        Encoding.RRE,
        Encoding.CORRE,
        Encoding.HEXTILE,
        Encoding.ZLIB,
        Encoding.TIGHT,
        Encoding.TIGHT_PNG,
        Encoding.ZRLE,
        Encoding.ZYWRLE,
    }
)

# ---------------------------------------------------------------------------
# Limits: every length read from the wire is checked against one of these
# before anything is allocated for it.
# ---------------------------------------------------------------------------

#: Longest failure reason (handshake, SecurityResult) we accept.
MAX_REASON_LENGTH = 64 * 1024
#: Longest desktop name in ServerInit.
MAX_SERVER_NAME_LENGTH = 64 * 1024
#: Longest ServerCutText / ClientCutText body, plain or Extended Clipboard.
MAX_CUT_TEXT_LENGTH = 4 * 1024 * 1024
#: QEMU's own limit on a ClientCutText body, plain or extended (`ui/vnc.c`
#: `protocol_client_msg`): a longer one makes QEMU drop the connection.
QEMU_MAX_CLIENT_CUT_TEXT = 1024 * 1024
#: The most an Extended Clipboard provide may inflate to in QEMU (`ui/vnc-clipboard.c`
#: `inflate_buffer`); beyond it QEMU silently drops the data.
QEMU_MAX_CLIPBOARD_INFLATED = 1024 * 1024
#: Largest QEMU audio data chunk (QEMU sends about 1.8 kB at 44.1 kHz stereo S16).
MAX_AUDIO_CHUNK = 1024 * 1024
#: Number of colour map entries addressable by a 16-bit first + count.
MAX_COLOUR_MAP_ENTRIES = 65536
#: Largest framebuffer side we accept (QEMU's own limit is 5120 x 2560).
MAX_FRAMEBUFFER_DIMENSION = 16384
#: Most rectangles in one FramebufferUpdate (a u16 holds 65535; 0xFFFF with LastRect).
MAX_RECTANGLES_PER_UPDATE = 65535
#: Largest compressed rectangle body (zlib, ZRLE, Tight data) we buffer.
MAX_COMPRESSED_RECT_LENGTH = 64 * 1024 * 1024
#: Largest cursor side (rich, X or alpha cursor).
MAX_CURSOR_DIMENSION = 256
#: Most screens in an ExtendedDesktopSize rectangle (a u8 allows 255).
MAX_SCREENS = 255
#: Most security types / VeNCrypt subtypes offered (u8 counts).
MAX_SECURITY_TYPES = 255
#: Most encodings we send or accept in SetEncodings.
MAX_ENCODINGS = 1024
#: Highest QEMU audio frequency (QEMU refuses more).
MAX_AUDIO_FREQUENCY = 48000
