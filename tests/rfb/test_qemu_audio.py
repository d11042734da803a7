"""QEMU's audio extension (pseudo-encoding -259, messages 255/1) over a ClientConnection.

Wire layouts, from rfbproto 7.5.9.2 / 7.6.8 and QEMU's `ui/vnc.c`:
client  ff 01 <u16 op>          op 0 enable, 1 disable,
        ff 01 00 02 <u8 format> <u8 channels> <u32 Hz>   set format;
server  ff 01 <u16 op>          op 0 end, 1 begin, 2 data + <u32 length> <bytes>.
"""

from __future__ import annotations

from typing import Any

import pytest

from resourced.audio import AudioFormat, SampleFormat
from resourced.errors import LocalProtocolError
from resourced.rfb.connection import ClientConnection
from resourced.rfb.constants import Encoding
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.messages import Bell, FramebufferUpdate, Rectangle
from resourced.rfb.qemu import AudioBegin, AudioData, AudioEnd, AudioSupported, QemuAudio

from . import wire

ENABLE = bytes.fromhex("ff 01 0000")
DISABLE = bytes.fromhex("ff 01 0001")
SET_S16_STEREO_44100 = bytes.fromhex("ff 01 00 02 03 02 00 00 ac 44")

WIDTH, HEIGHT = 64, 48
#: QEMU acknowledges the audio pseudo-encoding with a rectangle whose width and
#: height are the framebuffer's (they mean nothing).
ACK = wire.fbu(wire.rect(0, 0, WIDTH, HEIGHT, Encoding.QEMU_AUDIO))
ACK_UPDATE = FramebufferUpdate(
    (Rectangle(RectangleHeader(0, 0, WIDTH, HEIGHT, Encoding.QEMU_AUDIO), b""),)
)


def audio_conn(audio: QemuAudio) -> ClientConnection:
    return wire.connected(width=WIDTH, height=HEIGHT, extensions=[audio])


def acked(audio: QemuAudio) -> ClientConnection:
    conn = audio_conn(audio)
    assert wire.feed_all(conn, ACK) == [AudioSupported(), ACK_UPDATE]
    return conn


def test_nothing_sent_before_the_ack() -> None:
    audio = QemuAudio()
    conn = audio_conn(audio)
    assert conn.data_to_send() == b""
    assert not audio.supported
    assert not audio.enabled


def test_ack_auto_enables_with_set_format_then_enable() -> None:
    audio = QemuAudio()
    conn = audio_conn(audio)
    assert wire.feed_all(conn, ACK) == [AudioSupported(), ACK_UPDATE]
    assert conn.data_to_send().hex() == (SET_S16_STEREO_44100 + ENABLE).hex()
    assert audio.supported
    assert audio.enabled


def test_ack_bytewise_sends_the_same() -> None:
    conn = audio_conn(QemuAudio())
    assert wire.feed_bytewise(conn, ACK) == [AudioSupported(), ACK_UPDATE]
    assert conn.data_to_send() == SET_S16_STEREO_44100 + ENABLE


def test_second_ack_is_quiet() -> None:
    conn = acked(QemuAudio())
    conn.data_to_send()
    assert wire.feed_all(conn, ACK) == [ACK_UPDATE]
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("width", "height"), [(0, 0), (9999, 9999), (65535, 1)])
def test_ack_geometry_is_not_bounds_checked(width: int, height: int) -> None:
    conn = audio_conn(QemuAudio())
    events = wire.feed_all(conn, wire.fbu(wire.rect(7, 7, width, height, Encoding.QEMU_AUDIO)))
    assert events[0] == AudioSupported()


def test_ack_in_a_larger_update_enables_at_once() -> None:
    conn = audio_conn(QemuAudio())
    raw = wire.rect(0, 0, 1, 1, 0, b"\0\0\0\0")
    update = wire.fbu(wire.rect(0, 0, WIDTH, HEIGHT, Encoding.QEMU_AUDIO), raw)
    ack_end = 4 + 12
    # The update is not over, but the extension already answered.
    assert wire.feed_all(conn, update[:ack_end]) == [AudioSupported()]
    assert conn.data_to_send() == SET_S16_STEREO_44100 + ENABLE
    events = wire.feed_all(conn, update[ack_end:])
    assert len(events) == 1
    assert isinstance(events[0], FramebufferUpdate)
    assert len(events[0].rectangles) == 2


def test_auto_enable_off_sends_nothing_until_enable() -> None:
    audio = QemuAudio(auto_enable=False)
    conn = acked(audio)
    assert conn.data_to_send() == b""
    assert audio.supported
    assert not audio.enabled
    audio.enable()
    assert conn.data_to_send() == SET_S16_STEREO_44100 + ENABLE
    audio.enable()  # already enabled: nothing more
    assert conn.data_to_send() == b""


def test_disable_and_enable_again() -> None:
    audio = QemuAudio()
    conn = acked(audio)
    conn.data_to_send()
    audio.disable()
    assert conn.data_to_send() == DISABLE
    audio.disable()
    assert conn.data_to_send() == b""
    audio.enable()
    assert conn.data_to_send() == SET_S16_STEREO_44100 + ENABLE


def test_set_format_while_enabled_is_disable_set_enable() -> None:
    audio = QemuAudio()
    conn = acked(audio)
    conn.data_to_send()
    audio.set_format(AudioFormat(SampleFormat.U8, 1, 8000))
    assert (
        conn.data_to_send().hex()
        == (DISABLE + bytes.fromhex("ff 01 0002 00 01 00001f40") + ENABLE).hex()
    )
    assert audio.enabled


def test_set_format_while_disabled_sends_nothing() -> None:
    audio = QemuAudio(auto_enable=False)
    conn = acked(audio)
    audio.set_format(AudioFormat(SampleFormat.S32, 2, 48000))
    assert conn.data_to_send() == b""
    audio.enable()
    assert conn.data_to_send() == bytes.fromhex("ff 01 0002 05 02 0000bb80") + ENABLE


def test_set_format_before_the_ack_is_used_by_auto_enable() -> None:
    audio = QemuAudio()
    conn = audio_conn(audio)
    audio.set_format(AudioFormat(SampleFormat.U16, 2, 22050))
    assert conn.data_to_send() == b""
    wire.feed_all(conn, ACK)
    assert conn.data_to_send() == bytes.fromhex("ff 01 0002 02 02 00005622") + ENABLE


@pytest.mark.parametrize("action", ["enable", "disable"])
def test_enable_or_disable_before_the_ack_is_a_local_error(action: str) -> None:
    audio = QemuAudio(auto_enable=False)
    conn = audio_conn(audio)
    with pytest.raises(LocalProtocolError, match="not acknowledged"):
        getattr(audio, action)()
    assert conn.data_to_send() == b""


def test_enable_unattached_is_a_local_error() -> None:
    audio = QemuAudio()
    audio.supported = True
    with pytest.raises(LocalProtocolError, match="not attached"):
        audio.enable()


def test_one_extension_one_connection() -> None:
    audio = QemuAudio()
    ClientConnection(extensions=[audio])
    with pytest.raises(LocalProtocolError, match="already attached"):
        ClientConnection(extensions=[audio])


def test_two_audio_extensions_clash() -> None:
    with pytest.raises(LocalProtocolError, match="-259"):
        ClientConnection(extensions=[QemuAudio(), QemuAudio()])


def test_begin_data_end_events() -> None:
    conn = acked(QemuAudio())
    pcm = bytes(range(16))
    data = wire.audio_begin() + wire.audio_data(pcm) + wire.audio_data(b"") + wire.audio_end()
    fmt = AudioFormat()
    expected = [AudioBegin(fmt), AudioData(pcm, fmt), AudioData(b"", fmt), AudioEnd()]
    assert wire.feed_all(conn, data) == expected
    conn2 = acked(QemuAudio())
    assert wire.feed_bytewise(conn2, data) == expected


def test_audio_interleaved_with_other_messages() -> None:
    conn = acked(QemuAudio())
    data = wire.audio_begin() + wire.bell() + wire.audio_data(b"ab") + wire.fbu() + wire.bell()
    assert wire.feed_all(conn, data) == [
        AudioBegin(AudioFormat()),
        Bell(),
        AudioData(b"ab", AudioFormat()),
        FramebufferUpdate(()),
        Bell(),
    ]


def test_data_before_begin_is_in_the_enabled_format() -> None:
    audio = QemuAudio(AudioFormat(SampleFormat.S8, 1, 11025))
    conn = acked(audio)
    assert wire.feed_all(conn, wire.audio_data(b"\x01")) == [
        AudioData(b"\x01", AudioFormat(SampleFormat.S8, 1, 11025))
    ]


def test_format_tracking_across_a_change() -> None:
    first = AudioFormat()
    second = AudioFormat(SampleFormat.U8, 1, 8000)
    audio = QemuAudio(first)
    conn = acked(audio)
    events: list[Any] = []
    events += wire.feed_all(conn, wire.audio_begin() + wire.audio_data(b"1111"))
    audio.set_format(second)
    # Sent before QEMU saw the change: still the first format.
    events += wire.feed_all(conn, wire.audio_data(b"2222") + wire.audio_end())
    events += wire.feed_all(conn, wire.audio_begin() + wire.audio_data(b"3"))
    assert events == [
        AudioBegin(first),
        AudioData(b"1111", first),
        AudioData(b"2222", first),
        AudioEnd(),
        AudioBegin(second),
        AudioData(b"3", second),
    ]


def test_format_tracking_two_changes_in_a_row() -> None:
    formats = [
        AudioFormat(),
        AudioFormat(SampleFormat.S32, 2, 48000),
        AudioFormat(SampleFormat.U16, 1, 16000),
    ]
    audio = QemuAudio(formats[0])
    conn = acked(audio)
    events: list[Any] = []
    for i, fmt in enumerate(formats):
        if i:
            audio.set_format(fmt)
        events += wire.feed_all(
            conn, wire.audio_begin() + wire.audio_data(bytes([i])) + wire.audio_end()
        )
    assert [e.format for e in events if isinstance(e, AudioData)] == formats
    assert [e.format for e in events if isinstance(e, AudioBegin)] == formats


#: Sample format numbers of rfbproto 7.5.9.2.
WIRE_SAMPLE_FORMAT = {
    SampleFormat.U8: 0,
    SampleFormat.S8: 1,
    SampleFormat.U16: 2,
    SampleFormat.S16: 3,
    SampleFormat.U32: 4,
    SampleFormat.S32: 5,
}


@pytest.mark.parametrize("sample", list(SampleFormat))
@pytest.mark.parametrize("channels", [1, 2])
def test_every_sample_format_and_channel_count(sample: SampleFormat, channels: int) -> None:
    fmt = AudioFormat(sample, channels, 44100)
    conn = acked(QemuAudio(fmt))
    expected = bytes([0xFF, 0x01, 0x00, 0x02, WIRE_SAMPLE_FORMAT[sample], channels])
    expected += bytes([0x00, 0x00, 0xAC, 0x44])
    assert conn.data_to_send() == expected + ENABLE
    pcm = b"\x10" * fmt.frame_size * 3
    assert wire.feed_all(conn, wire.audio_begin() + wire.audio_data(pcm)) == [
        AudioBegin(fmt),
        AudioData(pcm, fmt),
    ]


def test_format_change_while_silent_labels_data_with_new_format() -> None:
    # QEMU (audio/audio.c) sends BEGIN only when a capture is attached while the
    # guest is playing, or when playback starts; removing a capture (disable) sends
    # nothing. So while the guest is silent, enable(first) gets no BEGIN, and after
    # set_format(second) the only capture left is the second one: the BEGIN that
    # comes when the guest starts playing, and the data after it, are in `second`.
    first = AudioFormat()
    second = AudioFormat(SampleFormat.U8, 1, 8000)
    audio = QemuAudio(first)
    conn = acked(audio)  # enabled in `first`; the guest is silent: no BEGIN
    audio.set_format(second)  # disable, set, enable: still silent, still no BEGIN
    assert conn.data_to_send().endswith(
        DISABLE + bytes.fromhex("ff 01 0002 00 01 00001f40") + ENABLE
    )
    events = wire.feed_all(conn, wire.audio_begin() + wire.audio_data(b"\x80\x80"))
    assert events == [AudioBegin(second), AudioData(b"\x80\x80", second)]
