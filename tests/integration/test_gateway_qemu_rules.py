"""The gateway is never looser than QEMU, and strips nothing QEMU supports.

Against real QEMU 7.2 (TCG), through an in-process gateway, with our own client:
what QEMU drops a connection for (a paste over 1 MiB, xvp it has not enabled or
of another version, ...) is refused by the gateway with a logged reason while
the session, its console and its audio go on; Extended Clipboard and xvp, which
the gateway used to strip from SetEncodings, now work through it. Where QEMU
itself enforces a rule, a test shows QEMU doing so on a direct connection, so
the gateway's check is known to matter.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from resourced.demo.bootsector import DEFAULT_BANNER
from resourced.errors import ResourcedError
from resourced.rfb import clipboard
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.connection import DEFAULT_ENCODINGS
from resourced.rfb.constants import Encoding, ExtendedClipboardFlag, XvpCode
from resourced.rfb.events import ServerClosed
from resourced.rfb.messages import (
    ClientCutText,
    ExtendedClientCutText,
    ExtendedServerCutText,
    FramebufferUpdate,
    KeyEvent,
    SetPixelFormat,
    XvpServerMessage,
)
from resourced.rfb.pixelformat import PixelFormat
from resourced.rfb.qemu import (
    AudioData,
    ExtendedKeyEventSupported,
    LedStateChanged,
    PointerModeChanged,
    QemuAudioEnable,
    QemuExtendedKeyEvent,
    QemuLedState,
    QemuPointerMotionChange,
)
from resourced.rfb.server import XvpMessage
from tests.integration.test_gateway import TIMEOUT, MakeRig, Rig, Viewer, viewer
from tests.integration.test_gateway import make_rig as make_rig  # the fixture, for pytest

TEXT = ExtendedClipboardFlag.TEXT
NOTIFY = ExtendedClipboardFlag.NOTIFY
REQUEST = ExtendedClipboardFlag.REQUEST
PROVIDE = ExtendedClipboardFlag.PROVIDE
CAPS = ExtendedClipboardFlag.CAPS
PASTE = 1536 * 1024  # the 1.5 MiB paste; QEMU takes at most 1 MiB
WITH_CLIPBOARD = (*DEFAULT_ENCODINGS, Encoding.EXTENDED_CLIPBOARD)


class Log(logging.Handler):
    """The gateway's log records, with a wait for one containing some text."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._changed.set()

    async def wait_for(self, text: str) -> str:
        async with asyncio.timeout(TIMEOUT):
            while True:
                for message in self.messages:
                    if text in message:
                        return message
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def gateway_log() -> Any:
    handler = Log()
    logger = logging.getLogger("resourced.gateway")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def direct(rig: Rig, **options: Any) -> RfbClient:
    """Our client straight to QEMU's VNC socket, bypassing the gateway."""
    return await connect(f"unix:{rig.guest.vnc_path}", timeout=TIMEOUT, **options)


async def dropped(client: RfbClient) -> str:
    """Wait until the server drops `client`; how it ended, for the assertion message."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                event = await client.next_event()
            except ResourcedError as err:
                return str(err)
            if isinstance(event, ServerClosed):
                return "closed"


async def open_serial(v: Viewer) -> int:
    """Open serial0 and wait for the guest's banner: from then on it echoes."""
    serial = await v.open("serial0")
    await v.pump(lambda: DEFAULT_BANNER in v.seen(serial))
    return serial


async def still_alive(v: Viewer, text: bytes) -> None:
    """The viewer's serial console echoes and, if it has audio, audio keeps coming."""
    serial = v.id("serial0")
    v.write(serial, text)
    await v.pump(lambda: text in v.output.get(serial, b""))
    if v.audio is not None:
        before = len(v.audio_chunks)
        await v.pump(lambda: len(v.audio_chunks) > before + 10)


async def clipboard_message(v: Viewer, flags: int) -> ExtendedServerCutText:
    """The next Extended Clipboard message with all of `flags` set."""

    def found() -> bool:
        return any(
            isinstance(e, ExtendedServerCutText) and e.flags & flags == flags for e in v.events
        )

    await v.pump(found)
    for i, event in enumerate(v.events):
        if isinstance(event, ExtendedServerCutText) and event.flags & flags == flags:
            del v.events[: i + 1]
            return event
    raise AssertionError("unreachable")


def send(v: Viewer, message: Any) -> None:
    v.client.send(message)
    v.client.flush()


# ---------------------------------------------------------------------------
# Cut text over QEMU's limit
# ---------------------------------------------------------------------------


async def test_qemu_drops_a_paste_over_1_mib(make_rig: MakeRig) -> None:
    """The premise, straight to QEMU: a 1.5 MiB ClientCutText ends the connection."""
    rig = await make_rig(guest_options={"audio": False})
    client = await direct(rig)
    try:
        client.send(ClientCutText(b"x" * PASTE))
        client.flush()
        await dropped(client)
    finally:
        await client.close()


async def test_oversized_paste_is_refused_and_the_session_goes_on(
    make_rig: MakeRig, gateway_log: Log
) -> None:
    """Issue 9 #5: the paste is refused with a logged reason; the viewer's console
    and audio go on, and a paste QEMU takes still reaches it (another viewer, with
    the Extended Clipboard, is told of it and fetches it)."""
    rig = await make_rig()
    paster = await viewer(rig, audio=True)
    other = await viewer(rig, encodings=WITH_CLIPBOARD)
    try:
        await open_serial(paster)
        await clipboard_message(other, CAPS)
        send(paster, ClientCutText(b"x" * PASTE))
        reason = await gateway_log.wait_for(f"ClientCutText of {PASTE} bytes not passed to QEMU")
        assert "1048576" in reason
        await still_alive(paster, b"after the big paste")
        send(paster, ClientCutText(b"a paste QEMU takes"))
        await clipboard_message(other, NOTIFY | TEXT)
        send(other, ExtendedClientCutText(int(REQUEST | TEXT)))
        provide = await clipboard_message(other, PROVIDE | TEXT)
        text = clipboard.parse_provide(provide.flags, provide.payload)[int(TEXT)]
        assert text.rstrip(b"\0") == b"a paste QEMU takes"
        assert not any("QEMU closed" in m for m in gateway_log.messages)
    finally:
        await paster.close()
        await other.close()


async def test_oversized_extended_provide_is_refused(make_rig: MakeRig, gateway_log: Log) -> None:
    """Over 1 MiB on the wire (QEMU would drop the connection) or inflating past
    QEMU's 1 MiB (QEMU would drop the data, silently): refused, logged, and the
    session goes on."""
    rig = await make_rig(guest_options={"audio": False})
    v = await viewer(rig, encodings=WITH_CLIPBOARD)
    try:
        serial = await open_serial(v)
        await clipboard_message(v, CAPS)
        send(v, ExtendedClientCutText(int(NOTIFY | TEXT)))
        incompressible = bytes(range(256)) * (PASTE // 256)
        send(v, ExtendedClientCutText(int(PROVIDE | TEXT), incompressible))
        await gateway_log.wait_for("an Extended Clipboard ClientCutText of")
        bomb = clipboard.provide_payload({int(TEXT): bytes(2 * 1024 * 1024)})
        assert len(bomb) < 1024 * 1024
        send(v, ExtendedClientCutText(int(PROVIDE | TEXT), bomb))
        await gateway_log.wait_for("inflates past QEMU's limit")
        v.write(serial, b"still here")
        await v.pump(lambda: b"still here" in v.output.get(serial, b""))
    finally:
        await v.close()


# ---------------------------------------------------------------------------
# Extended Clipboard through the gateway
# ---------------------------------------------------------------------------


async def test_extended_clipboard_between_two_viewers(make_rig: MakeRig) -> None:
    """Issue 9 #7 A: copy in one viewer, paste in the other, all through QEMU's
    clipboard: caps, notify, request, provide (zlib) in both directions."""
    rig = await make_rig(guest_options={"audio": False})
    a = await viewer(rig, encodings=WITH_CLIPBOARD)
    b = await viewer(rig, encodings=WITH_CLIPBOARD)
    try:
        for v in (a, b):
            caps = await clipboard_message(v, CAPS)
            assert (
                caps.flags & (NOTIFY | REQUEST | PROVIDE | TEXT)
                == NOTIFY | REQUEST | PROVIDE | TEXT
            )
        send(a, ExtendedClientCutText(int(NOTIFY | TEXT)))
        await clipboard_message(b, NOTIFY | TEXT)
        send(b, ExtendedClientCutText(int(REQUEST | TEXT)))
        await clipboard_message(a, REQUEST | TEXT)  # QEMU asks the owner
        copied = "copied in viewer A, \u00e9\u00e8\n".encode() + b"\0"
        send(a, ExtendedClientCutText(int(PROVIDE | TEXT), clipboard.provide_payload({1: copied})))
        provide = await clipboard_message(b, PROVIDE | TEXT)
        assert clipboard.parse_provide(provide.flags, provide.payload)[1] == copied
    finally:
        await a.close()
        await b.close()


async def test_extended_clipboard_message_without_the_encoding_ends_only_that_viewer(
    make_rig: MakeRig, gateway_log: Log
) -> None:
    """QEMU drops a client sending it unasked; the gateway ends that viewer with
    the reason (it breaks the protocol) before QEMU sees it."""
    rig = await make_rig(guest_options={"audio": False})
    client = await direct(rig)  # the premise: QEMU drops it
    try:
        client.send(ExtendedClientCutText(int(NOTIFY | TEXT)))
        client.flush()
        await dropped(client)
    finally:
        await client.close()
    v = await viewer(rig)
    try:
        await v.pump(lambda: v.consoles.announced)
        send(v, ExtendedClientCutText(int(NOTIFY | TEXT)))
        reason = await gateway_log.wait_for("never advertised")
        assert "Extended Clipboard" in reason
        assert not any("QEMU closed" in m for m in gateway_log.messages)
    finally:
        await v.close()


# ---------------------------------------------------------------------------
# xvp
# ---------------------------------------------------------------------------


async def test_xvp_through_the_gateway(make_rig: MakeRig, gateway_log: Log) -> None:
    """Issue 9 #7 B: with power-control=on QEMU's xvp INIT reaches the viewer, and
    the viewer's xvp messages reach QEMU (reboot is answered FAIL: QEMU cannot)."""
    rig = await make_rig(guest_options={"audio": False, "vnc_power_control": True})
    client = await direct(rig, encodings=(*DEFAULT_ENCODINGS, Encoding.XVP))
    try:  # the premise: QEMU drops a client sending xvp version 2
        async with asyncio.timeout(TIMEOUT):
            while await client.next_event() != XvpServerMessage(1, XvpCode.INIT):
                pass
        client.send(XvpMessage(2, XvpCode.RESET))
        client.flush()
        await dropped(client)
    finally:
        await client.close()
    v = await viewer(rig, encodings=(*DEFAULT_ENCODINGS, Encoding.XVP))
    try:
        serial = await open_serial(v)
        await v.pump(lambda: XvpServerMessage(1, XvpCode.INIT) in v.events)
        send(v, XvpMessage(1, XvpCode.REBOOT))
        await v.pump(lambda: XvpServerMessage(1, XvpCode.FAIL) in v.events)
        # QEMU drops a client with another xvp version; the gateway refuses it.
        send(v, XvpMessage(2, XvpCode.RESET))
        await gateway_log.wait_for("xvp version 2; QEMU takes only 1")
        v.write(serial, b"still here")
        await v.pump(lambda: b"still here" in v.output.get(serial, b""))
    finally:
        await v.close()


async def test_qemu_drops_xvp_it_has_not_enabled(make_rig: MakeRig) -> None:
    """The premise: without power-control, an xvp message ends a direct connection."""
    rig = await make_rig(guest_options={"audio": False})
    client = await direct(rig, encodings=(*DEFAULT_ENCODINGS, Encoding.XVP))
    try:
        client.send(XvpMessage(1, XvpCode.SHUTDOWN))
        client.flush()
        await dropped(client)
    finally:
        await client.close()


async def test_xvp_without_power_control_is_refused(make_rig: MakeRig, gateway_log: Log) -> None:
    rig = await make_rig(guest_options={"audio": False})
    v = await viewer(rig, encodings=(*DEFAULT_ENCODINGS, Encoding.XVP))
    try:
        serial = await open_serial(v)
        send(v, XvpMessage(1, XvpCode.SHUTDOWN))
        await gateway_log.wait_for("QEMU has not enabled xvp")
        v.write(serial, b"still here")
        await v.pump(lambda: b"still here" in v.output.get(serial, b""))
        assert not any(isinstance(e, XvpServerMessage) for e in v.events)
    finally:
        await v.close()


# ---------------------------------------------------------------------------
# Audio and pixel format
# ---------------------------------------------------------------------------


async def test_audio_message_before_qemus_ack_is_refused(
    make_rig: MakeRig, gateway_log: Log
) -> None:
    """A viewer that never advertised audio enables it: refused, so QEMU does not
    start sending audio messages the viewer cannot read."""
    rig = await make_rig()
    v = await viewer(rig)
    try:
        serial = await open_serial(v)
        send(v, QemuAudioEnable())
        await gateway_log.wait_for("QEMU has not acknowledged audio")
        v.write(serial, b"still here")
        await v.pump(lambda: b"still here" in v.output.get(serial, b""))
        assert not any(isinstance(e, AudioData) for e in v.events)
    finally:
        await v.close()


async def test_colour_mapped_8_bits_is_framed(make_rig: MakeRig) -> None:
    """A colour map at 8 bits per pixel (what QEMU serves one at) passes: the
    gateway frames QEMU's 1-byte pixels."""
    rig = await make_rig(guest_options={"audio": False})
    v = await viewer(rig, encodings=(Encoding.RAW,))
    try:
        await v.pump(lambda: v.consoles.announced)
        mapped = PixelFormat(8, 8, False, False, 7, 7, 3, 0, 3, 6)
        send(v, SetPixelFormat(mapped))
        v.client.connection.request_update(incremental=False)
        v.client.flush()
        await v.pump(lambda: any(isinstance(e, FramebufferUpdate) for e in v.events))
        update = next(e for e in v.events if isinstance(e, FramebufferUpdate))
        for rect in update.rectangles:
            if rect.header.encoding == Encoding.RAW:
                assert len(rect.body) == rect.header.width * rect.header.height
    finally:
        await v.close()


@pytest.mark.parametrize(
    ("pixel_format", "reason"),
    [
        (PixelFormat(32, 24, False, False, 255, 255, 255, 16, 8, 0), "colour map at 32 bits"),
        (PixelFormat(32, 24, False, True, 0, 255, 255, 16, 8, 0), "colour maximum of 0"),
    ],
)
async def test_pixel_format_qemu_would_replace_ends_the_session(
    make_rig: MakeRig, gateway_log: Log, pixel_format: PixelFormat, reason: str
) -> None:
    rig = await make_rig(guest_options={"audio": False})
    v = await viewer(rig)
    try:
        await v.pump(lambda: v.consoles.announced)
        send(v, SetPixelFormat(pixel_format))
        message = await gateway_log.wait_for(reason)
        assert "disconnected" in message
    finally:
        await v.close()


# ---------------------------------------------------------------------------
# When QEMU does close
# ---------------------------------------------------------------------------


async def test_qemu_closing_is_logged_with_what_was_last_sent(
    make_rig: MakeRig, gateway_log: Log
) -> None:
    rig = await make_rig(guest_options={"audio": False})
    v = await viewer(rig)
    try:
        await v.pump(lambda: v.consoles.announced)
        send(v, KeyEvent(True, 0x61))
        send(v, KeyEvent(False, 0x61))
        await rig.guest.stop()
        message = await gateway_log.wait_for("the last message the gateway sent it was")
        assert "KeyEvent (8 bytes)" in message
    finally:
        await v.close()


# ---------------------------------------------------------------------------
# Malformed messages QEMU drops a connection for
# ---------------------------------------------------------------------------


class RawMessage:
    """Bytes sent as they are: a message our own serializers refuse to build."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data


MALFORMED = [
    pytest.param(b"\xff\x01\x00\x02\x09\x02\x00\x00\xac\x44", "set-format", id="audio-format-9"),
    pytest.param(b"\xff\x01\x00\x02\x03\x03\x00\x00\xac\x44", "set-format", id="audio-channels-3"),
    pytest.param(b"\xff\x01\x00\x02\x03\x02\x00\x01\x77\x00", "set-format", id="audio-96000-hz"),
    pytest.param(b"\xff\x01\x00\x07", "unknown client operation 7", id="audio-op-7"),
    pytest.param(b"\xff\x09", "unknown QEMU client submessage 9", id="qemu-submessage-9"),
    pytest.param(
        b"\x00\x00\x00\x00" + bytes.fromhex("18 18 00 01 00ff 00ff 00ff 10 08 00 000000"),
        "bits-per-pixel 24",
        id="pixel-format-24-bits",
    ),
    pytest.param(
        b"\x06\x00\x00\x00\xff\xff\xff\xfd\x00\x00\x00", "shorter than its flags", id="clipboard-3"
    ),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
async def test_malformed_message_qemu_drops_for_never_reaches_it(
    make_rig: MakeRig, gateway_log: Log, data: bytes, reason: str
) -> None:
    """QEMU drops a connection for each of these (shown straight to QEMU); through
    the gateway the viewer that sent it is disconnected with the gateway's own
    reason, QEMU never sees it, and other viewers carry on."""
    rig = await make_rig()
    encodings = (*DEFAULT_ENCODINGS, Encoding.EXTENDED_CLIPBOARD, Encoding.QEMU_AUDIO)
    client = await direct(rig, encodings=encodings)
    try:
        client.send(RawMessage(data))
        client.flush()
        await dropped(client)
    finally:
        await client.close()
    bystander = await viewer(rig)
    v = await viewer(rig, audio=True, encodings=WITH_CLIPBOARD)
    try:
        await open_serial(bystander)
        await v.pump(lambda: bool(v.audio_chunks))  # QEMU acknowledged audio
        send(v, RawMessage(data))
        message = await gateway_log.wait_for("disconnected")
        assert reason in message
        assert "QEMU closed" not in message  # the gateway's reason, not QEMU's close
        assert not any("QEMU closed" in m for m in gateway_log.messages)
        await still_alive(bystander, b"the others carry on")
    finally:
        await v.close()
        await bystander.close()


# ---------------------------------------------------------------------------
# Pseudo-encodings QEMU answers at once
# ---------------------------------------------------------------------------


async def test_pseudo_encodings_qemu_answers_reach_a_viewer_as_directly(make_rig: MakeRig) -> None:
    """Issue 9 #7, the rest of QEMU's pseudo-encodings: extended key events,
    pointer motion change and LED state are each answered by QEMU as soon as a
    viewer lists them; through the gateway the viewer gets each answer as it
    does straight from QEMU (none filtered out or lost in framing)."""
    rig = await make_rig(guest_options={"audio": False})
    wanted = {ExtendedKeyEventSupported, PointerModeChanged, LedStateChanged}
    for label, address in (("QEMU", f"unix:{rig.guest.vnc_path}"), ("gateway", rig.address)):
        extensions = [QemuExtendedKeyEvent(), QemuPointerMotionChange(), QemuLedState()]
        client = await connect(address, extensions=extensions, timeout=TIMEOUT)
        seen: set[type] = set()
        try:
            async with asyncio.timeout(TIMEOUT):
                while not wanted <= seen:
                    seen.add(type(await client.next_event()))
        except TimeoutError:
            raise AssertionError(f"{label}: only {seen & wanted} of {wanted}") from None
        finally:
            await client.close()
