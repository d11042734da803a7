"""The Audio interface against a real QEMU guest (its PC speaker plays a 440 Hz
tone) behind a real gateway, the service started by activation on a private bus:
recording the guest's sound to WAV, the properties a subscribed client sees, a
guest whose VNC server has no audio, and `resourcectl audio`. Playback into
PulseAudio and PipeWire is in `test_audio_playback.py`."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import tempfile
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dbus_fast import Variant

from resourced.audio import AudioFormat, SampleFormat, analyse
from tests.dbus.conftest import BUS_NAME, ROOT, TIMEOUT, GatewayGuest, Session, call, ok
from tests.dbus.signals import Signals, get_property

MANAGER = f"{BUS_NAME}.Manager"
AUDIO = f"{BUS_NAME}.Audio"
ERROR = f"{BUS_NAME}.Error."
DEMO = f"{ROOT}/guests/demo"
#: The demo guest's PC speaker: PIT divisor 2712 (resourced.demo.bootsector).
TONE_HZ = 1193182 / 2712


async def wait_for_file(path: Path, size: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not os.path.exists(path) or os.path.getsize(path) < size:
            await asyncio.sleep(0.1)


def read_wav(path: Path) -> tuple[AudioFormat, bytes]:
    with wave.open(str(path), "rb") as wav:
        assert wav.getsampwidth() == 2
        fmt = AudioFormat(SampleFormat.S16, wav.getnchannels(), wav.getframerate())
        return fmt, wav.readframes(wav.getnframes())


async def test_record_the_guests_tone(session: Session, gateway_guest: GatewayGuest) -> None:
    """Record(path) connects, writes the guest's tone into a WAV file in the
    configured format, and shows in the properties; StopRecording ends it."""
    session.write_config(
        "[libvirt]\nuris = []\n[guests]\nidle-timeout = 600\n"
        '[audio]\nautostart = false\nformat = "s16"\nchannels = 1\nrate = 22050\n'
    )
    target = session.directory / "demo.wav"
    bus = await session.client()
    signals = await Signals(bus).start()
    try:
        (path,) = ok(
            await call(
                bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway_guest.address, {}]
            )
        )
        assert path == DEMO
        ok(await call(bus, DEMO, AUDIO, "Record", "sa{sv}", [str(target), {}]))
        await signals.wait_property(DEMO, AUDIO, "Recording", str(target))
        await signals.wait_property(DEMO, AUDIO, "Available", True)
        assert await get_property(bus, DEMO, AUDIO, "Format") == "s16 1ch 22050 Hz"
        # A second recording at once is refused with a reason.
        again = await call(bus, DEMO, AUDIO, "Record", "sa{sv}", [str(target) + "2", {}])
        assert again.error_name == ERROR + "InvalidArgument", again.body
        assert "already recording" in str(again.body[0])
        # Two seconds of mono 16-bit at 22050 Hz, plus the header.
        await wait_for_file(target, 44 + 2 * 22050 * 2)
        (written,) = ok(await call(bus, DEMO, AUDIO, "StopRecording", "a{sv}", [{}]))
        assert written == str(target)
        await signals.wait_property(DEMO, AUDIO, "Recording", "")
        # Not playing: autostart is off and nobody called Start.
        assert await get_property(bus, DEMO, AUDIO, "Playing") is False
    finally:
        bus.disconnect()
    fmt, pcm = read_wav(target)
    assert (fmt.channels, fmt.rate) == (1, 22050)
    measured = analyse(pcm, fmt)
    assert measured.seconds >= 2.0
    assert abs(measured.frequency_hz - TONE_HZ) < TONE_HZ * 0.02, measured
    assert measured.rms_dbfs > -30, measured  # a tone, not silence


async def test_a_recording_that_cannot_be_written_is_a_named_error(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    """The file stops growing mid-recording (the service's file-size limit, as a
    full disk would): the recording ends by itself (Recording ""), and the
    StopRecording that follows is Failed naming the file and the cause, not a path
    that looks like a good recording. The next recording works."""
    session.write_config("[guests]\nidle-timeout = 600\n[audio]\nautostart = false\n")
    target = session.directory / "cut.wav"
    bus = await session.client()
    signals = await Signals(bus).start()
    pid = None
    try:
        ok(
            await call(
                bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway_guest.address, {}]
            )
        )
        ok(await call(bus, DEMO, AUDIO, "Record", "sa{sv}", [str(target), {}]))
        await signals.wait_property(DEMO, AUDIO, "Recording", str(target))
        await wait_for_file(target, 44 + 4800)
        pid = session.service_pid()
        assert pid is not None
        # Only the soft limit: the hard one stays, so it can be raised back.
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (os.path.getsize(target) + 4096, hard))
        await signals.wait_property(DEMO, AUDIO, "Recording", "")
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        pid = None
        failed = await call(bus, DEMO, AUDIO, "StopRecording", "a{sv}", [{}])
        assert failed.error_name == ERROR + "Failed", failed.body
        message = str(failed.body[0])
        assert str(target) in message, message
        assert "File too large" in message, message
        # Told once: the next StopRecording has nothing to stop.
        (stopped,) = ok(await call(bus, DEMO, AUDIO, "StopRecording", "a{sv}", [{}]))
        assert stopped == ""
        again = session.directory / "again.wav"
        ok(await call(bus, DEMO, AUDIO, "Record", "sa{sv}", [str(again), {}]))
        await wait_for_file(again, 44 + 48000)
        (written,) = ok(await call(bus, DEMO, AUDIO, "StopRecording", "a{sv}", [{}]))
        assert written == str(again)
    finally:
        if pid is not None:
            _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        bus.disconnect()
    fmt, pcm = read_wav(again)
    assert abs(analyse(pcm, fmt).frequency_hz - TONE_HZ) < TONE_HZ * 0.02


async def test_bad_recordings_are_named_errors(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    """A relative path, a path that cannot be written, unknown options, a volume
    out of range: InvalidArgument with a sentence, and nothing is left behind."""
    bus = await session.client()
    try:
        ok(
            await call(
                bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway_guest.address, {}]
            )
        )
        relative = await call(bus, DEMO, AUDIO, "Record", "sa{sv}", ["x.wav", {}])
        assert relative.error_name == ERROR + "InvalidArgument", relative.body
        nowhere = session.directory / "no" / "such" / "dir" / "x.wav"
        missing = await call(bus, DEMO, AUDIO, "Record", "sa{sv}", [str(nowhere), {}])
        assert missing.error_name == ERROR + "InvalidArgument", missing.body
        assert str(nowhere) in str(missing.body[0])
        assert await get_property(bus, DEMO, AUDIO, "Recording") == ""
        # An existing file is neither overwritten nor removed.
        kept = session.directory / "kept.wav"
        kept.write_bytes(b"precious")
        existing = await call(bus, DEMO, AUDIO, "Record", "sa{sv}", [str(kept), {}])
        assert existing.error_name == ERROR + "InvalidArgument", existing.body
        assert "exists" in str(existing.body[0])
        assert kept.read_bytes() == b"precious"
        unknown = await call(bus, DEMO, AUDIO, "Start", "a{sv}", [{"loud": Variant("b", True)}])
        assert unknown.error_name == ERROR + "InvalidArgument", unknown.body
        result = session.busctl("set-property", BUS_NAME, DEMO, AUDIO, "Volume", "d", "1.5")
        assert result.returncode != 0
        assert "0.0 to 1.0" in result.stderr, result.stderr
        (stopped,) = ok(await call(bus, DEMO, AUDIO, "StopRecording", "a{sv}", [{}]))
        assert stopped == ""  # none ran
    finally:
        bus.disconnect()


@pytest.fixture
async def xvnc() -> AsyncIterator[Path]:
    """TigerVNC's Xvnc, a real VNC server with no QEMU audio, on a Unix socket."""
    binary = shutil.which("Xvnc")
    assert binary is not None, "Xvnc is not installed (Debian package tigervnc-standalone-server)"
    directory = Path(tempfile.mkdtemp(prefix="rsd-xvnc-", dir="/tmp"))
    socket_path = directory / "vnc.sock"
    display = 40 + os.getpid() % 400
    process = await asyncio.create_subprocess_exec(
        binary,
        f":{display}",
        "-rfbunixpath",
        str(socket_path),
        "-rfbport",
        "0",
        "-SecurityTypes",
        "None",
        "-nolisten",
        "tcp",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            while not os.path.exists(socket_path):
                assert process.returncode is None, "Xvnc exited"
                await asyncio.sleep(0.05)
        yield socket_path
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_guest_without_audio_says_so(session: Session, xvnc: Path) -> None:
    """A VNC server with no QEMU audio (Xvnc): Unsupported with the reason, and
    Available false once the server has been reached."""
    bus = await session.client()
    try:
        address = f"unix:{xvnc}"
        (path,) = ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["mute", address, {}]))
        target = session.directory / "mute.wav"
        refused = await call(bus, path, AUDIO, "Record", "sa{sv}", [str(target), {}])
        assert refused.error_name == ERROR + "Unsupported", refused.body
        assert "offers no audio" in str(refused.body[0])
        assert not target.exists()  # nothing half-made is left
        assert await get_property(bus, path, AUDIO, "Available") is False
        assert await get_property(bus, path, AUDIO, "Recording") == ""
    finally:
        bus.disconnect()


async def test_resourcectl_audio_record_and_status(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    result = session.resourcectl("add", "demo", gateway_guest.address)
    assert result.returncode == 0, result.stderr
    target = session.directory / "ctl.wav"
    result = session.resourcectl("audio", "demo", "record", str(target))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    await wait_for_file(target, 44 + 48000 * 4)  # the default: s16, 2 ch, 48000 Hz
    status = session.resourcectl("audio", "demo", "status", "--json")
    assert status.returncode == 0, status.stderr
    values = json.loads(status.stdout)
    assert values["Available"] is True
    assert values["Recording"] == str(target)
    assert values["Format"] == "s16 2ch 48000 Hz"
    text = session.resourcectl("audio", "demo", "status")
    assert f"recording to {target}" in text.stdout, text.stdout
    result = session.resourcectl("audio", "demo", "stop-recording")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    fmt, pcm = read_wav(target)
    assert abs(analyse(pcm, fmt).frequency_hz - TONE_HZ) < TONE_HZ * 0.02
    empty = session.resourcectl("audio", "demo", "record", "")
    assert empty.returncode == 2, empty.stderr
    assert "Traceback" not in empty.stderr
    bad = session.resourcectl("audio", "demo", "volume", "2")
    assert bad.returncode == 2  # argparse: a usage error, before any call
    assert "outside 0.0-1.0" in bad.stderr
    nobody = session.resourcectl("audio", "nobody", "status")
    assert nobody.returncode != 0
    assert "no guest named 'nobody'" in nobody.stderr
