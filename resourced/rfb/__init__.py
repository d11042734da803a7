"""The RFB (VNC) protocol, client side, sans-IO, with QEMU's extensions.

Feed bytes to a `ClientConnection`, take events out, write `data_to_send()`.
`resourced.rfb.aio` is the one module here that does I/O (asyncio transports).
"""

from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb.connection import DEFAULT_ENCODINGS, ClientConnection, State
from resourced.rfb.events import (
    Connected,
    CursorShape,
    DesktopResized,
    PixelFormatChanged,
    ServerClosed,
)
from resourced.rfb.extension import Extension
from resourced.rfb.messages import (
    Bell,
    ClientCutText,
    FramebufferUpdate,
    FramebufferUpdateRequest,
    KeyEvent,
    PointerEvent,
    Rectangle,
    ServerCutText,
    SetColourMapEntries,
    SetEncodings,
    SetPixelFormat,
)
from resourced.rfb.qemu import (
    AudioBegin,
    AudioData,
    AudioEnd,
    AudioSupported,
    ExtendedKeyEventSupported,
    LedStateChanged,
    PointerModeChanged,
    QemuAudio,
    QemuExtendedKeyEvent,
    QemuLedState,
    QemuPointerMotionChange,
)
from resourced.rfb.security import TlsMode
from resourced.rfb.tls import TlsCredentials

__all__ = [
    "DEFAULT_ENCODINGS",
    "AudioBegin",
    "AudioData",
    "AudioEnd",
    "AudioSupported",
    "Bell",
    "ClientConnection",
    "ClientCutText",
    "Connected",
    "CursorShape",
    "DesktopResized",
    "ExtendedKeyEventSupported",
    "Extension",
    "FramebufferUpdate",
    "FramebufferUpdateRequest",
    "KeyEvent",
    "LedStateChanged",
    "LocalProtocolError",
    "PixelFormatChanged",
    "PointerEvent",
    "PointerModeChanged",
    "QemuAudio",
    "QemuExtendedKeyEvent",
    "QemuLedState",
    "QemuPointerMotionChange",
    "Rectangle",
    "RemoteProtocolError",
    "ServerClosed",
    "ServerCutText",
    "SetColourMapEntries",
    "SetEncodings",
    "SetPixelFormat",
    "State",
    "TlsCredentials",
    "TlsMode",
]
