"""Private sound servers for tests, the benchmark and the demo: PulseAudio or PipeWire.

`PrivatePulseAudio(directory)` runs `pulseaudio -n` with a native-protocol socket
in `directory` and one null sink; `PrivatePipeWire(directory)` runs PipeWire,
WirePlumber and pipewire-pulse headless with their own runtime directory and a
private session bus, and loads the same null sink through `pactl`. Either offers
`.server` (the PULSE_SERVER string a client connects to), `.sink` (the null
sink; record what is played from `SINK.monitor` with `Recorder`), `start()`,
`stop()`, and `kill()` for fault tests (a later `start()` brings the server back
on the same socket). Readiness is waited for by asking the server (`pactl info`,
the sink listed), never by sleeping.

`Recorder` runs `parec` on a sink's monitor and keeps what it read with the time
of each read.

This is a harness, not a sound-server manager: each instance owns its directory's
contents and its processes, nothing else; the caller owns the directory.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from resourced.audio import AudioFormat, SampleFormat
from resourced.errors import ResourcedError

__all__ = [
    "PrivatePipeWire",
    "PrivatePulseAudio",
    "RecordedChunk",
    "Recorder",
    "SoundServerError",
]

SINK_NAME: Final = "resourced_test"
RECORD_FORMAT: Final = AudioFormat(SampleFormat.S16, 2, 48000)  # what Recorder asks parec for
_START_TIMEOUT: Final = 20.0  # seconds a server may take to answer (2 busy cores)
_STOP_TIMEOUT: Final = 5.0  # seconds a SIGTERM may take before SIGKILL
_POLL_INTERVAL: Final = 0.05  # seconds between checks of a condition we wait for
_SUN_PATH_MAX: Final = 107
_STDERR_TAIL: Final = 3000
_PAREC_FORMATS: Final = {
    SampleFormat.U8: "u8",
    SampleFormat.S16: "s16le",
    SampleFormat.S32: "s32le",
}


class SoundServerError(ResourcedError):
    """A private sound server could not be started or asked something."""


class _Process:
    """One child process, its stderr kept in a file for error messages."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-_STDERR_TAIL:]
        except OSError:
            return ""

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                async with asyncio.timeout(_STOP_TIMEOUT):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def _spawn(name: str, argv: list[str], env: Mapping[str, str], log: Path) -> _Process:
    if shutil.which(argv[0]) is None:
        raise SoundServerError(f"{argv[0]} is not installed (see scripts/setup)")
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            env=dict(env),
            start_new_session=True,
        )
    return _Process(name, proc, log)


class _SoundServer(abc.ABC):
    """What both servers share: the environment, pactl, readiness, the null sink."""

    kind: str = ""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.sink = SINK_NAME
        self._processes: list[_Process] = []

    # Subclasses say where the socket is and how to start their processes.
    @property
    @abc.abstractmethod
    def socket_path(self) -> Path: ...

    @abc.abstractmethod
    async def _launch(self) -> None: ...

    async def _after_ready(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Anything to do once pactl answers (load the sink)."""

    @property
    def server(self) -> str:
        """The PULSE_SERVER string for clients."""
        return f"unix:{self.socket_path}"

    def client_env(self) -> dict[str, str]:
        """An environment for pactl/parec/paplay that reaches only this server."""
        env = dict(os.environ)
        env["PULSE_SERVER"] = self.server
        # A client must not find a cookie or autospawn anything of the user's.
        env["HOME"] = str(self.directory / "home")
        env["XDG_RUNTIME_DIR"] = str(self.directory / "xdg")
        env.pop("PULSE_SINK", None)
        return env

    @property
    def running(self) -> bool:
        return bool(self._processes) and all(p.proc.returncode is None for p in self._processes)

    async def pactl(self, *args: str, timeout: float = 10.0) -> str:
        """Run pactl against this server; its stdout, or SoundServerError."""
        proc = await asyncio.create_subprocess_exec(
            "pactl",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.client_env(),
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise SoundServerError(f"pactl {' '.join(args)} took over {timeout} s") from None
        if proc.returncode != 0:
            raise SoundServerError(
                f"pactl {' '.join(args)} failed: {err.decode(errors='replace').strip()}"
            )
        return out.decode(errors="replace")

    async def start(self) -> None:
        """Start the server (again, after `kill()`) and wait until it plays to the sink."""
        if self.running:
            return
        if len(str(self.socket_path)) > _SUN_PATH_MAX:
            raise SoundServerError(f"directory too deep for a Unix socket: {self.directory}")
        if shutil.which("pactl") is None:
            raise SoundServerError("pactl is not installed (pulseaudio-utils, see scripts/setup)")
        for sub in ("home", "xdg"):
            (self.directory / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._processes = []
        try:
            await self._launch()
            await self._wait_ready()
            await self._after_ready()
            await self._wait_sink()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last = ""
        while True:
            for p in self._processes:
                if p.proc.returncode is not None:
                    raise SoundServerError(f"{p.name} exited with {p.proc.returncode}: {p.tail()}")
            if self.socket_path.exists():
                try:
                    await self.pactl("info", timeout=5.0)
                    return
                except SoundServerError as error:
                    last = str(error)
            if time.monotonic() > deadline:
                tails = "; ".join(f"{p.name}: {p.tail()}" for p in self._processes)
                raise SoundServerError(
                    f"{self.kind} did not answer within {_START_TIMEOUT} s ({last}) {tails}"
                )
            await asyncio.sleep(_POLL_INTERVAL)

    async def _wait_sink(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while self.sink not in (await self.pactl("list", "short", "sinks")).split():
            if time.monotonic() > deadline:
                raise SoundServerError(f"{self.kind}: sink {self.sink} never appeared")
            await asyncio.sleep(_POLL_INTERVAL)
        await self.pactl("set-default-sink", self.sink)

    async def stop(self) -> None:
        """Stop every process of this server (politely, then not)."""
        processes, self._processes = self._processes, []
        for p in reversed(processes):
            await p.stop()

    async def kill(self) -> None:
        """SIGKILL the sound server (a crash); `start()` brings it back on the same socket."""
        processes, self._processes = self._processes, []
        for p in reversed(processes):
            await p.stop(signal.SIGKILL)

    async def sink_inputs(self) -> list[dict[str, str]]:
        """`pactl list sink-inputs`, one dict per input: its properties plus a few fields."""
        text = await self.pactl("list", "sink-inputs")
        inputs: list[dict[str, str]] = []
        current: dict[str, str] | None = None
        for line in text.splitlines():
            stripped = line.strip()
            if line.startswith("Sink Input #"):
                current = {"index": line.split("#", 1)[1].strip()}
                inputs.append(current)
            elif current is None or ("=" not in stripped and ":" not in stripped):
                continue
            elif "=" in stripped and line.startswith("\t\t"):
                key, _, value = stripped.partition("=")
                current[key.strip()] = value.strip().strip('"')
            elif ":" in stripped:
                key, _, value = stripped.partition(":")
                current.setdefault(key.strip(), value.strip())
        return inputs

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class PrivatePulseAudio(_SoundServer):
    """`pulseaudio -n` on a private socket, with a null sink without rewinds."""

    kind = "PulseAudio"

    @property
    def socket_path(self) -> Path:
        return self.directory / "pulse.sock"

    async def _launch(self) -> None:
        env = dict(os.environ)
        env["HOME"] = str(self.directory / "home")
        env["XDG_RUNTIME_DIR"] = str(self.directory / "xdg")
        env.pop("PULSE_SERVER", None)
        # The socket file of a killed server is left behind; PulseAudio refuses
        # to bind over it only while someone listens, so a stale one is removed.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        argv = [
            "pulseaudio",
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            "--use-pid-file=no",
            f"--load=module-native-protocol-unix socket={self.socket_path} auth-anonymous=1",
            # Without norewinds the null sink runs at ~2 s latency and rewinds, and
            # low-latency writers stall: see /work/shared/ENVIRONMENT.md.
            f"--load=module-null-sink sink_name={self.sink} norewinds=1",
        ]
        self._processes.append(
            await _spawn("pulseaudio", argv, env, self.directory / "pulseaudio.log")
        )


class PrivatePipeWire(_SoundServer):
    """PipeWire + WirePlumber + pipewire-pulse, headless, with a private session bus."""

    kind = "PipeWire"

    @property
    def socket_path(self) -> Path:
        return self.directory / "xdg" / "pulse" / "native"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HOME"] = str(self.directory / "home")
        env["XDG_RUNTIME_DIR"] = str(self.directory / "xdg")
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={self.directory / 'bus'}"
        env.pop("PULSE_SERVER", None)
        env.pop("PIPEWIRE_REMOTE", None)
        return env

    async def _launch(self) -> None:
        env = self._env()
        bus = self.directory / "bus"
        with contextlib.suppress(FileNotFoundError):
            bus.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._processes.append(
            await _spawn(
                "dbus-daemon",
                [
                    "dbus-daemon",
                    "--session",
                    f"--address=unix:path={bus}",
                    "--nofork",
                    "--nopidfile",
                ],
                env,
                self.directory / "dbus.log",
            )
        )
        await self._wait_path(bus, "dbus-daemon")
        self._processes.append(
            await _spawn("pipewire", ["pipewire"], env, self.directory / "pipewire.log")
        )
        await self._wait_path(self.directory / "xdg" / "pipewire-0", "pipewire")
        self._processes.append(
            await _spawn("wireplumber", ["wireplumber"], env, self.directory / "wireplumber.log")
        )
        self._processes.append(
            await _spawn(
                "pipewire-pulse", ["pipewire-pulse"], env, self.directory / "pipewire-pulse.log"
            )
        )

    async def _wait_path(self, path: Path, name: str) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while not await asyncio.to_thread(path.exists):
            for p in self._processes:
                if p.proc.returncode is not None:
                    raise SoundServerError(f"{p.name} exited with {p.proc.returncode}: {p.tail()}")
            if time.monotonic() > deadline:
                raise SoundServerError(f"{name} did not create {path} within {_START_TIMEOUT} s")
            await asyncio.sleep(_POLL_INTERVAL)

    async def _after_ready(self) -> None:
        await self.pactl("load-module", "module-null-sink", f"sink_name={self.sink}")


@dataclass(frozen=True, slots=True)
class RecordedChunk:
    """What one read from parec returned, and when (time.monotonic())."""

    time: float
    data: bytes


class Recorder:
    """`parec` on a source (a sink's `.monitor`), kept in memory with read times.

    The record latency sets PipeWire's graph quantum (rounded up to a power of
    two) while nothing else asks for less: the default 20 ms (1024 frames)
    stays below a player's 50 ms first prebuffer, and above the 5 ms quantum
    that 10 ms would give, which a busy 2-core machine does not always meet.
    With 50 ms or more, the 4096-frame quantum a new stream first sees is more
    than its prebuffer and it underruns at once.
    """

    def __init__(
        self,
        server: _SoundServer,
        source: str | None = None,
        fmt: AudioFormat = RECORD_FORMAT,
        *,
        latency_msec: int = 20,
    ) -> None:
        if fmt.sample_format not in _PAREC_FORMATS:
            raise ValueError(f"parec cannot record {fmt.sample_format.value} here")
        self.server = server
        self.source = source or f"{server.sink}.monitor"
        self.format = fmt
        self.latency_msec = latency_msec
        self.chunks: list[RecordedChunk] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def data(self) -> bytes:
        return b"".join(c.data for c in self.chunks)

    def data_since(self, when: float) -> bytes:
        """What was read at or after `when` (time.monotonic())."""
        return b"".join(c.data for c in self.chunks if c.time >= when)

    async def start(self) -> None:
        if shutil.which("parec") is None:
            raise SoundServerError("parec is not installed (pulseaudio-utils, see scripts/setup)")
        self._proc = await asyncio.create_subprocess_exec(
            "parec",
            "-d",
            self.source,
            "--raw",
            f"--format={_PAREC_FORMATS[self.format.sample_format]}",
            f"--rate={self.format.rate}",
            f"--channels={self.format.channels}",
            f"--latency-msec={self.latency_msec}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=self.server.client_env(),
        )
        self._reader = asyncio.create_task(self._read())
        # Once the monitor delivers, the server has settled its graph around
        # the recording (PipeWire re-chooses its quantum when a stream joins).
        await self.wait_for_bytes(1, timeout=10.0)

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while chunk := await self._proc.stdout.read(65536):
            self.chunks.append(RecordedChunk(time.monotonic(), chunk))

    async def wait_for_bytes(self, count: int, timeout: float = 20.0) -> None:
        """Wait until at least `count` bytes have been recorded."""
        async with asyncio.timeout(timeout):
            while sum(len(c.data) for c in self.chunks) < count:
                if self._reader is not None and self._reader.done():
                    raise SoundServerError("parec stopped recording")
                await asyncio.sleep(_POLL_INTERVAL)

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            await self._proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
        self._proc = None
        self._reader = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
