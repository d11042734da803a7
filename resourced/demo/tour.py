"""The README's "run" job: the resourced service with the demo guest, as a user sees it.

Starts the demo guest (QEMU under TCG: a boot sector that beeps, writes a
banner to its serial port and echoes what it receives) and the console gateway
in front of it; then the resourced service on the user's session bus, or, where
there is none (a fresh server), on a private `dbus-daemon` whose address it
prints. It registers the guest as `demo` and shows, with the same tools a
user has: `resourcectl list`, the serial banner from the console's history,
an echo through an fd from `Console.Open` and through a PTY from `OpenPty`
(opened as a file, as `screen` or `picocom` would), the guest's beep played
through the sound server (the desktop's, or a private PulseAudio where there is
none) and recorded back from its monitor, and then recorded to a WAV file by
the service (`resourcectl audio demo record`). Then it stays up for `resourcectl console demo` in
another terminal until Ctrl-C; `--once` stops after the tour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from resourced.audio import AudioFormat, SampleFormat, analyse
from resourced.cli import EXIT_INTERRUPTED, failing_as, run_command
from resourced.demo.bootsector import tone_frequency
from resourced.demo.probe import demo_gateway_config
from resourced.demo.qemu import GuestConfig, QemuGuest
from resourced.demo.soundserver import RECORD_FORMAT, PrivatePulseAudio
from resourced.errors import ResourcedError
from resourced.gateway.gateway import Gateway

BUS_NAME = "org.resourced.Resourced1"
ROOT = "/org/resourced/Resourced1"
TIMEOUT = 60.0
BIN = Path(sys.executable).parent


def _read_until(fd: int, wanted: bytes, seen: bytes = b"") -> bytes:
    deadline = time.monotonic() + TIMEOUT
    while wanted not in seen:
        if time.monotonic() > deadline:
            raise ResourcedError(f"the guest did not send {wanted!r} within {TIMEOUT:g} s")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise ResourcedError("the console closed")
            seen += chunk
    return seen


def bus_config(socket: Path, services: Path, *, any_user: bool = False) -> str:
    """A `dbus-daemon --session` configuration: listening on `socket`, activating
    services from `services`; `any_user` lets other users connect too (tests)."""
    users = '<allow user="*"/>' if any_user else ""
    return (
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        f"<busconfig><type>session</type><listen>unix:path={socket}</listen>"
        f"<servicedir>{services}</servicedir><auth>EXTERNAL</auth>"
        f'<policy context="default">{users}<allow send_destination="*" eavesdrop="true"/>'
        '<allow eavesdrop="true"/><allow own="*"/></policy></busconfig>\n'
    )


class PrivateBus:
    """A `dbus-daemon --session` of our own, for machines with no session bus."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.log_path = directory / "service.log"

    def start(self, env: dict[str, str] | None = None) -> str:
        """Start the bus; services it activates get `env` (default: ours)."""
        services = self.directory / "share"
        subprocess.run(
            [str(BIN / "resourced"), "install-user-service", "--prefix", str(services)],
            check=True,
            capture_output=True,
            env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": ""},
        )
        config = self.directory / "bus.conf"
        socket_path = self.directory / "bus"
        config.write_text(bus_config(socket_path, services / "dbus-1" / "services"))
        # What the services it activates print (the service's log) goes here.
        self.log_path = self.directory / "service.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + TIMEOUT
        while not socket_path.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise ResourcedError("the private dbus-daemon did not start")
            time.sleep(0.05)
        self.address = f"unix:path={socket_path}"
        return self.address

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)


def _session_bus_usable() -> bool:
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS", "")
    if not address.startswith("unix:path="):
        return bool(address)
    return Path(address.split("=", 1)[1].split(",")[0]).exists()


async def _call(
    bus: MessageBus, path: str, interface: str, member: str, signature: str, body: list[object]
) -> Message:
    reply = await bus.call(
        Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
    )
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise ResourcedError(f"{member}: {reply.error_name}: {reply.body[0] if reply.body else ''}")
    return reply


def _show(command: list[str], env: dict[str, str]) -> str:
    print(f"$ {' '.join(command)}")
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if result.returncode in (-signal.SIGINT, EXIT_INTERRUPTED):
        # Ctrl-C reached it too (our process group): the tour is stopping, and
        # what it said (Python's traceback, if it came while Python started) is
        # no news.
        raise ResourcedError(f"{command[0]} was interrupted")
    output = (result.stdout + result.stderr).rstrip()
    print("\n".join(f"  {line}" for line in output.splitlines()))
    if result.returncode != 0:
        raise ResourcedError(f"{command[0]} failed with status {result.returncode}")
    return result.stdout


async def tour(workdir: Path, once: bool, wav: Path, duration: float) -> None:
    private = None if _session_bus_usable() else PrivateBus(workdir)
    env = dict(os.environ)
    sound: PrivatePulseAudio | None = None
    starting: asyncio.Future[str] | None = None
    # Ctrl-C may come while the sound server or the bus is starting: they go too.
    # (The private PulseAudio runs in a session of its own; Ctrl-C does not reach it.)
    try:
        desktop_sound = await asyncio.to_thread(_sound_server_answers, env)
        if private is not None:
            if not desktop_sound:
                # No sound server either (a fresh server): a private one, which the
                # service activated on our private bus is told of by its environment.
                sound = PrivatePulseAudio(workdir / "sound")
                await sound.start()
                env["PULSE_SERVER"] = sound.server
                print(f"sound:     no sound server here; a private PulseAudio at {sound.server}")
            # Shielded: a Ctrl-C meanwhile does not stop the thread starting the
            # bus; the cleanup below waits for it, then stops what it started.
            starting = asyncio.ensure_future(asyncio.to_thread(private.start, env))
            env["DBUS_SESSION_BUS_ADDRESS"] = await asyncio.shield(starting)
            print(f"bus:       no session bus here; a private one at {private.address}")
            print(f"           (the service's log: {private.log_path})")
            print(f"           (export DBUS_SESSION_BUS_ADDRESS={private.address} to use it)")
        else:
            await asyncio.to_thread(
                subprocess.run,
                [str(BIN / "resourced"), "install-user-service"],
                check=True,
                capture_output=True,
            )
            print(f"bus:       the session bus ({env['DBUS_SESSION_BUS_ADDRESS']})")
        config = GuestConfig(
            workdir=workdir / "guest", extra_args=("-name", "resourced demo guest")
        )
        guest = QemuGuest(config)
        await guest.start(timeout=TIMEOUT)
        gateway = Gateway(demo_gateway_config(guest))
        bus: MessageBus | None = None
        try:
            await gateway.start()
            gateway_path = workdir / "gateway.sock"
            await gateway.listen_unix(str(gateway_path))
            print(f"guest:     QEMU under TCG; the gateway in front of it at unix:{gateway_path}")
            bus = await MessageBus(
                bus_address=env["DBUS_SESSION_BUS_ADDRESS"],
                bus_type=BusType.SESSION,
                negotiate_unix_fd=True,
            ).connect()
            await asyncio.to_thread(
                _show, ["resourcectl", "add", "demo", f"unix:{gateway_path}"], env
            )
            serial = f"{ROOT}/guests/demo/consoles/serial0"
            deadline = time.monotonic() + TIMEOUT
            while "serial0" not in await asyncio.to_thread(_quiet, ["resourcectl", "list"], env):
                if time.monotonic() > deadline:
                    raise ResourcedError("the demo guest's consoles did not appear")
                await asyncio.sleep(0.1)
            await asyncio.to_thread(_show, ["resourcectl", "list"], env)
            history = await asyncio.to_thread(
                _show, ["resourcectl", "history", "demo", "serial0"], env
            )
            if "resourced demo guest" not in history:
                raise ResourcedError("the banner is not in the console's history")
            # An app: Console.Open gives an fd carrying the console both ways.
            reply = await _call(bus, serial, f"{BUS_NAME}.Console", "Open", "a{sv}", [{}])
            with socket.socket(fileno=reply.unix_fds[reply.body[0]]) as app:
                app.sendall(b"typed into an fd")
                # In a thread: the gateway runs on this event loop.
                await asyncio.to_thread(_read_until, app.fileno(), b"typed into an fd")
            print("fd:        Console.Open -> fd; typed 'typed into an fd', the guest echoed it")
            # A script: OpenPty gives a path, used like any serial device.
            pty_path = (
                await asyncio.to_thread(_show, ["resourcectl", "pty", "demo", "serial0"], env)
            ).strip()
            fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY)
            try:
                os.write(fd, b"typed into a pty")
                await asyncio.to_thread(_read_until, fd, b"typed into a pty")
            finally:
                os.close(fd)
            print(f"pty:       opened {pty_path}; typed 'typed into a pty', the guest echoed it")
            await _sound_tour(env, sound, desktop_sound, wav, duration, config.tone_hz)
            if once:
                return
            print()
            if private is not None:
                print(f"Try it:    export DBUS_SESSION_BUS_ADDRESS={private.address}")
                print(f"           {BIN}/resourcectl console demo        (Ctrl-] leaves)")
            else:
                print(f"Try it:    {BIN}/resourcectl console demo        (Ctrl-] leaves)")
            print("           busctl --user tree org.resourced.Resourced1")
            print("Ctrl-C stops the demo.")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()
        finally:
            if bus is not None:
                # The user's own service outlives the tour: it forgets the guest.
                # A private bus and its service go with the tour instead (and
                # after a Ctrl-C our connection to that bus was seen closed
                # already: a message sent on it fails inside dbus-fast, which
                # logs the failure as a traceback).
                if private is None:
                    with contextlib.suppress(Exception):
                        await _call(
                            bus,
                            ROOT,
                            f"{BUS_NAME}.Manager",
                            "RemoveGuest",
                            "oa{sv}",
                            [f"{ROOT}/guests/demo", {}],
                        )
                bus.disconnect()
            await gateway.close()
            await guest.stop()
    finally:
        if starting is not None:
            with contextlib.suppress(Exception):
                await starting
        if private is not None:
            if private.address:
                _stop_service(private.address)
            private.stop()
        if sound is not None:
            await sound.stop()


def _sound_server_answers(env: dict[str, str]) -> bool:
    """Whether a PulseAudio (or pipewire-pulse) server answers with this environment."""
    try:
        result = subprocess.run(
            ["pactl", "info"], env=env, capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _parec(env: dict[str, str], source: str, seconds: float) -> bytes:
    """`seconds` of what `source` (a sink's monitor) hears, as RECORD_FORMAT."""
    fmt = RECORD_FORMAT
    wanted = int(seconds * fmt.byte_rate)
    with subprocess.Popen(
        [
            "parec",
            "-d",
            source,
            "--raw",
            "--format=s16le",
            f"--rate={fmt.rate}",
            f"--channels={fmt.channels}",
            "--latency-msec=20",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as parec:
        assert parec.stdout is not None
        data = b""
        deadline = time.monotonic() + seconds + TIMEOUT
        while len(data) < wanted and time.monotonic() < deadline:
            ready, _, _ = select.select([parec.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(parec.stdout.fileno(), 65536)
                if not chunk:
                    break
                data += chunk
        parec.terminate()
    return data[:wanted]


async def _sound_tour(
    env: dict[str, str],
    sound: PrivatePulseAudio | None,
    desktop_sound: bool,
    wav: Path,
    duration: float,
    tone_hz: int,
) -> None:
    """The guest's beep played through the sound server and recorded back, then
    recorded to a WAV file by the service."""
    if sound is not None or desktop_sound:
        await asyncio.to_thread(_show, ["resourcectl", "audio", "demo", "on"], env)
        deadline = time.monotonic() + TIMEOUT
        while '"Playing": true' not in await asyncio.to_thread(
            _quiet, ["resourcectl", "audio", "demo", "status", "--json"], env
        ):
            if time.monotonic() > deadline:
                raise ResourcedError("the demo guest's sound did not start playing")
            await asyncio.sleep(0.1)
        source = f"{sound.sink}.monitor" if sound is not None else "@DEFAULT_MONITOR@"
        where = "the private PulseAudio" if sound is not None else "your sound server"
        heard = analyse(await asyncio.to_thread(_parec, env, source, 2.0), RECORD_FORMAT)
        print(
            f"played:    the guest's beep through {where}; recorded back from {source}: "
            f"{heard.seconds:.1f} s, {heard.frequency_hz:.0f} Hz, {heard.rms_dbfs:.1f} dBFS"
        )
        tone = tone_frequency(tone_hz)
        if abs(heard.frequency_hz - tone) > 0.03 * tone:
            raise ResourcedError("the beep did not come back from the sound server")
        await asyncio.to_thread(_show, ["resourcectl", "audio", "demo", "status"], env)
        await asyncio.to_thread(_show, ["resourcectl", "audio", "demo", "off"], env)
    else:
        print("sound:     the session bus's service plays into your sound server, and none")
        print("           answers here (pactl info): playback skipped, recording shown")
    # The service makes only new files: the last tour's recording goes first.
    await asyncio.to_thread(wav.unlink, True)
    await asyncio.to_thread(_show, ["resourcectl", "audio", "demo", "record", str(wav)], env)
    await asyncio.sleep(duration)
    await asyncio.to_thread(_show, ["resourcectl", "audio", "demo", "stop-recording"], env)
    with wave.open(str(wav), "rb") as recorded:
        fmt = AudioFormat(
            SampleFormat.S16 if recorded.getsampwidth() == 2 else SampleFormat.U8,
            recorded.getnchannels(),
            recorded.getframerate(),
        )
        measured = analyse(recorded.readframes(recorded.getnframes()), fmt)
    print(
        f"recorded:  {wav}: {measured.seconds:.1f} s of {fmt}, "
        f"{measured.frequency_hz:.0f} Hz, {measured.rms_dbfs:.1f} dBFS"
    )


def _quiet(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return result.stdout


def _stop_service(address: str) -> None:
    """The service we activated on our private bus goes with it."""
    result = subprocess.run(
        ["busctl", f"--address={address}", "status", BUS_NAME], capture_output=True, text=True
    )
    for line in result.stdout.splitlines():
        if line.startswith("PID="):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line[4:]), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resourced.demo.tour", description=__doc__)
    parser.add_argument("--once", action="store_true", help="stop after the tour")
    parser.add_argument("--wav", type=Path, default=Path("out/demo-beep.wav"))
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    return run_command("resourced demo", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    with failing_as(f"cannot make the folder for {args.wav}"):
        args.wav.parent.mkdir(parents=True, exist_ok=True)
    args.wav = args.wav.resolve()  # the service writes it, from its own directory
    with failing_as("cannot make a work folder in /tmp"):
        workdir = Path(tempfile.mkdtemp(prefix="rsd-demo-", dir="/tmp"))
    try:
        asyncio.run(tour(workdir, args.once, args.wav, args.duration))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
