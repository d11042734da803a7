"""A guest's sound played by the service into real sound servers, every test on
both PulseAudio and PipeWire (private servers with a null sink, recorded back
with `parec` from its monitor): QEMU's PC speaker (440 Hz) -> the gateway -> the
service -> the sound server -> parec.

What is checked: the tone has no gap of 1 ms or more and holds its pitch in
every 250 ms of the recording; the stream is named after the guest; Volume and Muted set over D-Bus
change what is recorded, and set with `pactl` show up on D-Bus as
PropertiesChanged. Faults: the sound server killed and started again, the guest
paused and resumed, the VNC connection dropped and restored; each time the
service keeps running and the tone comes back within a stated bound.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from resourced.audio import AudioFormat, analyse, samples
from resourced.demo.soundserver import (
    RECORD_FORMAT,
    PrivatePipeWire,
    PrivatePulseAudio,
    Recorder,
)
from tests.dbus.conftest import (
    BUS_NAME,
    ROOT,
    TIMEOUT,
    GatewayGuest,
    Session,
    call,
    ok,
    start_gateway,
    stop_process,
)
from tests.dbus.signals import Signals, get_property

MANAGER = f"{BUS_NAME}.Manager"
AUDIO = f"{BUS_NAME}.Audio"
PROPERTIES = "org.freedesktop.DBus.Properties"
DEMO = f"{ROOT}/guests/demo"
TONE_HZ = 1193182 / 2712
#: Pitch tolerance: the player may steer its rate by up to 3 % to follow the
#: guest's clock (README, "The sound player"), and zero crossings over a
#: PITCH_WINDOW measure to about 0.5 %.
PITCH_TOLERANCE = 0.035
#: Stretches of the recording whose pitch is measured (seconds).
PITCH_WINDOW = 0.25
#: Stretches whose level is measured (seconds).
WINDOW = 0.05
#: How long the tone may take to come back after each fault (seconds): the
#: link's reconnection backoff reaches 10 s; a sound server restart takes a few.
RECOVERY_BOUND = 30.0

SoundServer = PrivatePulseAudio | PrivatePipeWire


@pytest.fixture(params=["pulseaudio", "pipewire"])
async def sound(request: pytest.FixtureRequest) -> AsyncIterator[SoundServer]:
    directory = Path(tempfile.mkdtemp(prefix="rsd-snd-", dir="/tmp"))
    server: SoundServer = (
        PrivatePulseAudio(directory)
        if request.param == "pulseaudio"
        else PrivatePipeWire(directory)
    )
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def configure(session: Session, sound: SoundServer) -> None:
    session.write_config(
        "[libvirt]\nuris = []\n[guests]\nidle-timeout = 600\n"
        f'[audio]\nautostart = false\nserver = "{sound.server}"\n'
    )


def windows(
    pcm: bytes, fmt: AudioFormat = RECORD_FORMAT, window: float = WINDOW
) -> list[tuple[float, float]]:
    """(pitch Hz, RMS dBFS) of each `window` seconds of `pcm`."""
    step = int(window * fmt.rate) * fmt.frame_size
    return [
        (m.frequency_hz, m.rms_dbfs)
        for m in (analyse(pcm[i : i + step], fmt) for i in range(0, len(pcm) - step + 1, step))
    ]


def gaps(pcm: bytes, fmt: AudioFormat = RECORD_FORMAT) -> list[tuple[float, float]]:
    """(start s, length ms) of each stretch of 1 ms or more where the first
    channel is near silent: the speaker's square wave only crosses zero."""
    values = samples(pcm, fmt)[:: fmt.channels]
    threshold = 0.02 * fmt.sample_format.full_scale
    shortest = fmt.rate // 1000
    found: list[tuple[float, float]] = []
    start = -1
    for i, value in enumerate([*values, threshold]):
        if abs(value) < threshold:
            start = i if start < 0 else start
        elif start >= 0:
            if i - start >= shortest:
                found.append((start / fmt.rate, (i - start) * 1000 / fmt.rate))
            start = -1
    return found


def is_tone(window: tuple[float, float], floor_dbfs: float = -40.0) -> bool:
    pitch, level = window
    return abs(pitch - TONE_HZ) < TONE_HZ * PITCH_TOLERANCE and level > floor_dbfs


def holds_the_tone(pcm: bytes) -> bool:
    """No gap, and every PITCH_WINDOW at the tone's pitch (and loud)."""
    return not gaps(pcm) and all(is_tone(w) for w in windows(pcm, window=PITCH_WINDOW))


async def record(sound: SoundServer, seconds: float) -> bytes:
    """`seconds` of what the sound server plays, from the null sink's monitor."""
    async with Recorder(sound) as recorder:
        await recorder.wait_for_bytes(int(seconds * RECORD_FORMAT.byte_rate), timeout=TIMEOUT)
        return recorder.data


async def level_dbfs(sound: SoundServer, seconds: float = 1.0) -> float:
    """The median RMS level of the last `seconds` of a fresh recording."""
    levels = sorted(level for _pitch, level in windows(await record(sound, seconds + 0.5))[-20:])
    return levels[len(levels) // 2]


async def tone_comes_back(sound: SoundServer, bound: float) -> float:
    """Seconds until a full second of continuous tone is recorded (fails after `bound`)."""
    started = time.monotonic()
    async with asyncio.timeout(bound):
        while True:
            try:
                if holds_the_tone(await record(sound, 1.0)):
                    return time.monotonic() - started
            except Exception:
                if not sound.running:
                    raise
            await asyncio.sleep(0.2)


async def our_sink_input(sound: SoundServer) -> dict[str, str]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            inputs = [i for i in await sound.sink_inputs() if i.get("media.name") == "demo"]
            if inputs:
                return inputs[0]
            await asyncio.sleep(0.1)


async def start_demo(session: Session, gateway_guest: GatewayGuest, bus: MessageBus) -> Signals:
    signals = await Signals(bus).start()
    ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway_guest.address, {}]))
    ok(await call(bus, DEMO, AUDIO, "Start", "a{sv}", [{}]))
    await signals.wait_property(DEMO, AUDIO, "Playing", True)
    return signals


async def set_property(bus: MessageBus, name: str, value: Variant) -> None:
    ok(await call(bus, DEMO, PROPERTIES, "Set", "ssv", [AUDIO, name, value]))


async def test_sound_plays_with_volume_and_mute_both_ways(
    session: Session, gateway_guest: GatewayGuest, sound: SoundServer
) -> None:
    configure(session, sound)
    bus = await session.client()
    try:
        signals = await start_demo(session, gateway_guest, bus)
        stream = await our_sink_input(sound)
        assert stream["application.name"] == "resourced"
        assert stream["media.name"] == "demo"

        # Three seconds of tone, unbroken (no gap of 1 ms), at its pitch.
        heard = await record(sound, 3.0)
        # The stream may still be filling its prebuffer as the recording starts:
        # what counts begins with the tone.
        found = gaps(heard)
        if found and found[0][0] == 0:
            frames = round(found[0][1] * RECORD_FORMAT.rate / 1000)
            heard = heard[frames * RECORD_FORMAT.frame_size :]
        assert not gaps(heard), gaps(heard)[:10]
        pitches = windows(heard, window=PITCH_WINDOW)
        assert all(is_tone(w) for w in pitches), pitches
        latency = await get_property(bus, DEMO, AUDIO, "LatencyUsec")
        assert 0 < latency < 200_000, latency
        # Known gap (issue #8): PipeWire 0.3.65 sometimes reports one underflow
        # as the stream starts, which is counted although no gap is heard (the
        # recording above has none). More than that is a real fault.
        assert await get_property(bus, DEMO, AUDIO, "Underruns") <= 1

        # Volume over D-Bus is linear amplitude: 0.5 is 6 dB down in the recording.
        full = await level_dbfs(sound)
        await set_property(bus, "Volume", Variant("d", 0.5))
        await signals.wait_property(DEMO, AUDIO, "Volume", 0.5, approx=0.005)
        async with asyncio.timeout(TIMEOUT):
            while abs((half := await level_dbfs(sound)) - (full - 6.02)) > 1.0:
                pass
        assert math.isclose(half, full - 6.02, abs_tol=1.0), (full, half)

        # The mixer's volume (pactl: 50 % on its cubic scale) shows up on D-Bus.
        index = (await our_sink_input(sound))["index"]
        await sound.pactl("set-sink-input-volume", index, "50%")
        await signals.wait_property(DEMO, AUDIO, "Volume", 0.125, approx=0.01)

        # Muted over D-Bus: silence; unmuted in the mixer: D-Bus says so.
        await set_property(bus, "Muted", Variant("b", True))
        await signals.wait_property(DEMO, AUDIO, "Muted", True)
        async with asyncio.timeout(TIMEOUT):
            while await level_dbfs(sound) > -80:
                pass
        await sound.pactl("set-sink-input-mute", index, "0")
        await signals.wait_property(DEMO, AUDIO, "Muted", False)

        # Stop: the stream goes, and Playing says so.
        ok(await call(bus, DEMO, AUDIO, "Stop", "a{sv}", [{}]))
        await signals.wait_property(DEMO, AUDIO, "Playing", False)
    finally:
        bus.disconnect()


async def test_sound_server_killed_and_started_again(
    session: Session, gateway_guest: GatewayGuest, sound: SoundServer
) -> None:
    configure(session, sound)
    bus = await session.client()
    try:
        await start_demo(session, gateway_guest, bus)
        await tone_comes_back(sound, RECOVERY_BOUND)
        pid = session.service_pid()
        await sound.kill()
        await sound.start()
        took = await tone_comes_back(sound, RECOVERY_BOUND)
        print(f"tone back {took:.1f} s after {sound.kind} came back")
        assert session.service_pid() == pid  # the same service, still running
        assert await get_property(bus, DEMO, AUDIO, "Playing") is True
    finally:
        bus.disconnect()


async def test_guest_paused_and_resumed(
    session: Session, gateway_guest: GatewayGuest, sound: SoundServer
) -> None:
    """A paused QEMU sends nothing (and no END): the stream stops cleanly, no
    underrun is counted, and the tone comes back when the guest runs again."""
    configure(session, sound)
    bus = await session.client()
    try:
        signals = await start_demo(session, gateway_guest, bus)
        await tone_comes_back(sound, RECOVERY_BOUND)
        underruns = await get_property(bus, DEMO, AUDIO, "Underruns")
        await gateway_guest.guest.pause()
        await signals.wait_property(DEMO, AUDIO, "Playing", False)
        assert await get_property(bus, DEMO, AUDIO, "Underruns") == underruns
        await gateway_guest.guest.resume()
        await signals.wait_property(DEMO, AUDIO, "Playing", True)
        took = await tone_comes_back(sound, RECOVERY_BOUND)
        print(f"tone back {took:.1f} s after the guest resumed")
        assert await get_property(bus, DEMO, AUDIO, "Underruns") == underruns
    finally:
        bus.disconnect()


async def test_vnc_connection_dropped_and_restored(
    session: Session, gateway_guest: GatewayGuest, sound: SoundServer
) -> None:
    """The gateway (the guest's VNC server as the service sees it) killed and
    started again at the same socket: the service reconnects and plays again."""
    configure(session, sound)
    bus = await session.client()
    try:
        signals = await start_demo(session, gateway_guest, bus)
        await tone_comes_back(sound, RECOVERY_BOUND)
        pid = session.service_pid()
        gateway_guest.process.kill()
        gateway_guest.process.wait()
        await signals.wait_property(DEMO, AUDIO, "Playing", False)
        socket_path = Path(gateway_guest.address.removeprefix("unix:"))
        socket_path.unlink(missing_ok=True)
        process, address = await asyncio.to_thread(
            start_gateway, gateway_guest.guest, gateway_guest.directory
        )
        gateway_guest.process = process
        assert address == gateway_guest.address
        took = await tone_comes_back(sound, RECOVERY_BOUND)
        print(f"tone back {took:.1f} s after the gateway came back")
        assert session.service_pid() == pid
    finally:
        bus.disconnect()
        await asyncio.to_thread(stop_process, gateway_guest.process)


async def test_service_exits_when_its_bus_goes_while_playing(
    session: Session, gateway_guest: GatewayGuest, sound: SoundServer
) -> None:
    """The session bus ends (the daemon killed) while a guest plays: the service
    stops, though the objects it withdraws can no longer be signalled, and its
    sound server connection ends with it."""
    configure(session, sound)
    bus = await session.client()
    try:
        await start_demo(session, gateway_guest, bus)
        pid = session.service_pid()
        assert pid is not None
    finally:
        bus.disconnect()
    session.daemon.terminate()
    await asyncio.to_thread(session.daemon.wait, TIMEOUT)
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    log = (session.directory / "daemon.log").read_text(errors="replace")
    assert not _running(pid), f"the service ({pid}) is still running; its log:\n{log}"


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not reaped by init, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
