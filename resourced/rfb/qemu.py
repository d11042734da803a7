"""QEMU's extensions to RFB, each a small `Extension`: audio, LED state, keys, pointer.

- `QemuAudio`: pseudo-encoding -259 and message 255/1 (rfbproto 7.5.9.2, 7.6.8).
  Flow: advertise, wait for QEMU's ack rectangle (its width/height are the
  framebuffer size and mean nothing here), set the format, enable. A format change
  is disable, set, enable, since QEMU fixes the format when capture starts.
- `QemuLedState` (-261), `QemuExtendedKeyEvent` (-258, message 255/0) and
  `QemuPointerMotionChange` (-257).

Each parses only its own messages and does no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

from resourced.audio import AudioFormat, SampleFormat
from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb._buffer import Reader, u8, u16, u32
from resourced.rfb.constants import (
    MAX_AUDIO_CHUNK,
    AudioSampleFormat,
    ClientMessageType,
    Encoding,
    QemuAudioClientOp,
    QemuAudioServerOp,
    QemuClientSubtype,
    QemuServerSubtype,
    ServerMessageType,
)
from resourced.rfb.extension import Extension
from resourced.rfb.messages import QemuKeyEvent, Rectangle

_WIRE_FORMAT = {
    SampleFormat.U8: AudioSampleFormat.U8,
    SampleFormat.S8: AudioSampleFormat.S8,
    SampleFormat.U16: AudioSampleFormat.U16,
    SampleFormat.S16: AudioSampleFormat.S16,
    SampleFormat.U32: AudioSampleFormat.U32,
    SampleFormat.S32: AudioSampleFormat.S32,
}

# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QemuAudioEnable:
    """Client 255/1 op 0 (rfbproto 7.5.9.2)."""

    def serialize(self) -> bytes:
        return _audio_head() + u16(QemuAudioClientOp.ENABLE)


@dataclass(frozen=True, slots=True)
class QemuAudioDisable:
    """Client 255/1 op 1."""

    def serialize(self) -> bytes:
        return _audio_head() + u16(QemuAudioClientOp.DISABLE)


@dataclass(frozen=True, slots=True)
class QemuAudioSetFormat:
    """Client 255/1 op 2: u8 sample format, u8 channels, u32 frequency."""

    format: AudioFormat

    def serialize(self) -> bytes:
        return (
            _audio_head()
            + u16(QemuAudioClientOp.SET_FORMAT)
            + u8(_WIRE_FORMAT[self.format.sample_format])
            + u8(self.format.channels)
            + u32(self.format.rate)
        )


def _audio_head() -> bytes:
    return u8(ClientMessageType.QEMU) + u8(QemuClientSubtype.AUDIO)


def parse_client_audio(r: Reader) -> QemuAudioEnable | QemuAudioDisable | QemuAudioSetFormat:
    """Parse a client 255/1 message after its two type bytes (for gateways and tests)."""
    op = r.u16()
    if op == QemuAudioClientOp.ENABLE:
        return QemuAudioEnable()
    if op == QemuAudioClientOp.DISABLE:
        return QemuAudioDisable()
    if op == QemuAudioClientOp.SET_FORMAT:
        fmt, channels, rate = r.u8(), r.u8(), r.u32()
        try:
            sample = {v: k for k, v in _WIRE_FORMAT.items()}[AudioSampleFormat(fmt)]
            return QemuAudioSetFormat(AudioFormat(sample, channels, rate))
        except ValueError as err:
            raise RemoteProtocolError(f"QEMU audio set-format: {err}") from err
    raise RemoteProtocolError(f"QEMU audio: unknown client operation {op}")


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AudioSupported:
    """The server acknowledged the audio pseudo-encoding: audio can be enabled."""


@dataclass(frozen=True, slots=True)
class AudioBegin:
    """QEMU started capturing; data that follows is in `format`."""

    format: AudioFormat


@dataclass(frozen=True, slots=True)
class AudioEnd:
    """QEMU stopped capturing."""


@dataclass(frozen=True, slots=True)
class AudioData:
    """A chunk of interleaved little-endian PCM in `format`."""

    data: bytes
    format: AudioFormat

    def serialize(self) -> bytes:
        """The server message that carries this chunk (for test servers)."""
        return (
            u8(ServerMessageType.QEMU)
            + u8(QemuServerSubtype.AUDIO)
            + u16(QemuAudioServerOp.DATA)
            + u32(len(self.data))
            + self.data
        )


def audio_server_message(op: QemuAudioServerOp) -> bytes:
    """A BEGIN or END server message (for test servers)."""
    return u8(ServerMessageType.QEMU) + u8(QemuServerSubtype.AUDIO) + u16(op)


# ---------------------------------------------------------------------------
# Extensions
# ---------------------------------------------------------------------------


class QemuAudio(Extension):
    """Receive the guest's sound card output.

    With `auto_enable` (the default) audio is enabled in `format` as soon as the
    server acknowledges the extension. Each enable queues the format it was sent
    with; QEMU's BEGIN marks where that format takes effect, so `AudioData` always
    says the format its bytes are in, even across a format change.
    """

    pseudo_encodings: ClassVar[tuple[int, ...]] = (Encoding.QEMU_AUDIO,)
    server_subtypes: ClassVar[tuple[int, ...]] = (QemuServerSubtype.AUDIO,)

    def __init__(self, format: AudioFormat | None = None, *, auto_enable: bool = True) -> None:
        self.format = format or AudioFormat()
        self.auto_enable = auto_enable
        self.supported = False
        self.enabled = False
        self._pending: deque[AudioFormat] = deque()
        self._current: AudioFormat | None = None

    def on_rectangle(self, rect: Rectangle) -> list[Any]:
        first = not self.supported
        self.supported = True
        if first and self.auto_enable:
            self.enable()
        return [AudioSupported()] if first else []

    def _require_support(self) -> None:
        if not self.supported:
            raise LocalProtocolError("the server has not acknowledged QEMU audio (yet)")

    def enable(self) -> None:
        """Start receiving audio in `self.format`."""
        self._require_support()
        if self.enabled:
            return
        self.connection.send(QemuAudioSetFormat(self.format))
        self.connection.send(QemuAudioEnable())
        self._pending.append(self.format)
        self.enabled = True

    def disable(self) -> None:
        self._require_support()
        if not self.enabled:
            return
        self.connection.send(QemuAudioDisable())
        self.enabled = False
        # QEMU sends no BEGIN for a capture that never heard the guest play, so
        # formats still waiting for one are dead: the next BEGIN belongs to the
        # next enable.
        self._pending.clear()

    def set_format(self, format: AudioFormat) -> None:
        """Change the format; while enabled that means disable, set, enable."""
        was_enabled = self.enabled
        if was_enabled:
            self.disable()
        self.format = format
        if was_enabled:
            self.enable()

    def parse_server_message(self, subtype: int, reader: Reader) -> list[Any]:
        op = reader.u16()
        if op == QemuAudioServerOp.DATA:
            length = reader.u32()
            if length > MAX_AUDIO_CHUNK:
                raise RemoteProtocolError(
                    f"QEMU audio: data chunk of {length} bytes exceeds {MAX_AUDIO_CHUNK}"
                )
            data = reader.take(length)
            # Data before the first BEGIN is in the format we enabled with.
            fmt = self._current or (self._pending[0] if self._pending else self.format)
            return [AudioData(data, fmt)]
        if op == QemuAudioServerOp.BEGIN:
            if self._pending:
                self._current = self._pending.popleft()
            return [AudioBegin(self._current or self.format)]
        if op == QemuAudioServerOp.END:
            return [AudioEnd()]
        raise RemoteProtocolError(f"QEMU audio: unknown server operation {op}")


@dataclass(frozen=True, slots=True)
class LedStateChanged:
    """Keyboard LEDs of the guest (rfbproto 7.8.? "QEMU LED State Pseudo-encoding")."""

    scroll_lock: bool
    num_lock: bool
    caps_lock: bool


class QemuLedState(Extension):
    """Follow the guest keyboard's LED state (pseudo-encoding -261, 1-byte body)."""

    pseudo_encodings: ClassVar[tuple[int, ...]] = (Encoding.QEMU_LED_STATE,)

    def __init__(self) -> None:
        self.state: LedStateChanged | None = None

    def on_rectangle(self, rect: Rectangle) -> list[Any]:
        bits = rect.body[0]
        self.state = LedStateChanged(bool(bits & 1), bool(bits & 2), bool(bits & 4))
        return [self.state]


@dataclass(frozen=True, slots=True)
class ExtendedKeyEventSupported:
    """The server takes key events with scancodes (QEMU extended key event)."""


class QemuExtendedKeyEvent(Extension):
    """Send keys as scancodes, free of keymaps (pseudo-encoding -258, message 255/0)."""

    pseudo_encodings: ClassVar[tuple[int, ...]] = (Encoding.QEMU_EXTENDED_KEY_EVENT,)

    def __init__(self) -> None:
        self.supported = False

    def on_rectangle(self, rect: Rectangle) -> list[Any]:
        first = not self.supported
        self.supported = True
        return [ExtendedKeyEventSupported()] if first else []

    def key_event(self, down: bool, keysym: int, keycode: int) -> None:
        if not self.supported:
            raise LocalProtocolError("the server has not acknowledged extended key events")
        self.connection.send(QemuKeyEvent(down, keysym, keycode))


@dataclass(frozen=True, slots=True)
class PointerModeChanged:
    """Absolute (tablet) or relative (mouse) pointer events from now on."""

    absolute: bool


class QemuPointerMotionChange(Extension):
    """Follow QEMU's pointer mode (pseudo-encoding -257; the rectangle's x is the flag)."""

    pseudo_encodings: ClassVar[tuple[int, ...]] = (Encoding.QEMU_POINTER_MOTION_CHANGE,)

    def __init__(self) -> None:
        self.absolute: bool | None = None

    def on_rectangle(self, rect: Rectangle) -> list[Any]:
        self.absolute = bool(rect.header.x)
        return [PointerModeChanged(self.absolute)]
