"""Audio playback: gtk-vnc's PulseAudio path and resourced's, side by side in one run.

Run from the repository root:

    .venv/bin/python -m bench.audio_bench [--short] [--server pulseaudio|pipewire|both]
                                          [--seconds S | --minutes N] [--json FILE]

For each sound server asked for it starts a private one (PulseAudio, or
PipeWire with pipewire-pulse and WirePlumber), with a null sink per player,
and plays the same known signal through each player in turn, condition by
condition, recording each player's null sink with `parec` (raw s16le, 5 ms
latency unless `--record-latency-ms` says otherwise, every read time-stamped
with the monotonic clock). On PipeWire that latency also bounds the graph's
quantum (5 ms: 256 frames at 48 kHz), which sets how often a late graph
cycle drops out; see bench/README.md, "PipeWire's short gaps".

- **The signal** (`Signal`) comes from a test RFB server (`AudioServer`: our
  sans-IO `ServerConnection` and the QEMU audio messages of
  `resourced.rfb.qemu`) that behaves as QEMU does: it acknowledges
  pseudo-encoding -259 with a FramebufferUpdate rectangle, takes SetFormat and
  Enable, then sends BEGIN and the PCM in 10 ms chunks, in the format the
  client asked for, paced by the monotonic clock. The PCM is a steady 441 Hz
  tone (0.3 of full scale) with a numbered click every 500 ms: a 3 ms pulse
  at 0.9 of full scale (the marker), then 13 slots 2 ms apart, each holding a
  1 ms pulse or not: the click's number in 12 bits and a parity bit. The
  recording is searched for markers, and each click found is identified by
  its number, so a lost click cannot shift the others; the slots are matched
  at whatever speed within 6 % the click was played at.
- **Conditions**: steady; network jitter (chunks held back 0-30 ms, the hold
  drawn at random, then released together); sender clock skew of +1 % and
  -1 % (the server produces its samples 1 % faster or slower than real time,
  as a guest whose audio clock runs off the host's does). `--minutes N` runs
  a soak of jitter and +1 % skew together instead.
- **Players**, each a subprocess: gtk-vnc's own path (`GVnc.Connection` with
  `GVncPulse.AudioPulse`, from Debian's `/usr/bin/python3`:
  `bench/gtkvnc_audio_player.py`), and resourced's (`bench/resourced_audio_player.py`:
  our asyncio client and `resourced.sinks.pulse`, fed as the service feeds it).

Per player and condition it reports:

- **latency** p50 and p99 (nearest rank) in ms: from the moment the server
  wrote the chunk holding a click's first sample to its socket, to the moment
  that sample came out of the player's null sink, both on the monotonic clock.
  The recording's time for a sample is the time of the read that brought it,
  less the audio after it in that read; of the reads within 100 ms that carry
  it or follow it, the earliest such estimate is taken (a read the event loop
  picked up late only looks later). It includes the null sink's and `parec`'s
  own few ms, the same for both players;
- **drift**: the least-squares slope of latency over the run, in ms per minute,
  and the latency of the first and the last click (median of three each);
- **drop-outs**: gaps in the tone longer than 1 ms (a run of samples all below
  5.5 % of full scale, against a 30 % tone whose zero crossings stay under it
  for 0.13 ms), between the first and the last sound of the run; their count,
  total and longest;
- **speed**: how fast the player played against the sender, from the spacing
  of two clicks in a row in the recording (500 ms of the sender's audio) with
  no drop-out between them, as % off; the range over the run. A player that
  follows skew by resampling shows it here (it is a change of pitch too);
- **underruns**, when the player reports them (gtk-vnc does not);
- **CPU**: the player process's user plus system time (`/proc/PID/stat`, all
  its threads) from BEGIN to END, as a percentage of one core.

It prints one table per sound server (and writes JSON with `--json FILE`).
Nothing here asserts a timing; `tests/bench/test_audio_bench.py` runs `--short`.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import contextlib
import json
import math
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bus import cpu_seconds
from resourced.audio import AudioFormat
from resourced.demo.soundserver import PrivatePipeWire, PrivatePulseAudio, SoundServerError
from resourced.rfb.constants import Encoding, QemuAudioServerOp
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.messages import FramebufferUpdate, Rectangle, SetEncodings
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.qemu import (
    AudioData,
    QemuAudioDisable,
    QemuAudioEnable,
    QemuAudioSetFormat,
    audio_server_message,
)
from resourced.rfb.server import ClientClosed, ClientInitReceived, ServerConnection, ServerSecurity

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
SYSTEM_PYTHON = Path("/usr/bin/python3")
GTKVNC_PLAYER = ROOT / "bench" / "gtkvnc_audio_player.py"
RESOURCED_PLAYER = ROOT / "bench" / "resourced_audio_player.py"

GTKVNC = "gtk-vnc"
RESOURCED = "resourced"
# Our client alone, the sound dropped: the CPU floor under resourced's player.
FLOOR = "resourced-floor"
PLAYERS = (GTKVNC, RESOURCED, FLOOR)
PULSEAUDIO = "pulseaudio"
PIPEWIRE = "pipewire"

# The recording: what each null sink is made with and what parec asks for.
RECORD_RATE = 44100
RECORD_CHANNELS = 2
RECORD_FRAME = 4  # s16le stereo
# On PipeWire, parec's latency also sets the graph's quantum when no other
# stream asks for less: 5 ms makes it 256 frames at 48 kHz (see bench/README.md,
# "PipeWire's short gaps"; --record-latency-ms).
RECORD_LATENCY_MS = 5

CHUNK_SECONDS = 0.010
TONE_HZ = 441  # a whole number of cycles in a second: the tone table is one second long
TONE_LEVEL = 0.3
PULSE_LEVEL = 0.9
CLICK_INTERVAL = 0.5
MARKER_MS = 3.0
FIRST_SLOT_MS = 5.0
SLOT_MS = 2.0
BIT_PULSE_MS = 1.0
CLICK_BITS = 12  # then one parity bit
CLICK_SLOTS = CLICK_BITS + 1
CLICK_SPAN_MS = FIRST_SLOT_MS + CLICK_SLOTS * SLOT_MS  # marker to the end of the last slot
#: How far from the sender's speed a player may play and its clicks still decode.
MAX_SPEED_ERROR = 0.06
#: A gap in the tone that counts as a drop-out is longer than this.
DROPOUT_MS = 1.0

# Thresholds on the recording's high bytes (s16 >> 8): quiet is |x| < 1792
# (5.5 % of full scale), loud (a pulse) is x >= 19712 (60 %).
_QUIET = bytes.maketrans(
    bytes(range(256)), bytes(ord("q") if b <= 6 or b >= 249 else ord(".") for b in range(256))
)
_LOUD = bytes.maketrans(
    bytes(range(256)), bytes(ord("L") if 77 <= b <= 127 else ord(".") for b in range(256))
)


def log(message: str) -> None:
    print(f"[audio_bench] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A component did not start or answer; the message says which."""


# ---------------------------------------------------------------------------
# The signal
# ---------------------------------------------------------------------------


def click_slots(number: int) -> list[bool]:
    """The 13 slots of click `number`: its 12 bits, least significant first, then even parity."""
    if not 0 <= number < 1 << CLICK_BITS:
        raise ValueError(f"click number {number} does not fit {CLICK_BITS} bits")
    bits = [bool(number >> i & 1) for i in range(CLICK_BITS)]
    return [*bits, sum(bits) % 2 == 1]


class Signal:
    """The tone with numbered clicks, as PCM in one `AudioFormat`, frame by frame."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        rate = fmt.rate
        self.interval = round(rate * CLICK_INTERVAL)
        full = fmt.sample_format.full_scale
        offset = 0 if fmt.sample_format.signed else full
        top = full - 1
        self._typecode = fmt.sample_format.typecode
        self._tone = array.array(
            self._typecode,
            (
                offset
                + min(top, round(TONE_LEVEL * full * math.sin(2 * math.pi * TONE_HZ * i / rate)))
                for i in range(rate)
            ),
        )
        self._pulse = offset + min(top, round(PULSE_LEVEL * full))
        self._ms = rate / 1000

    def click_at(self, frame: int) -> int | None:
        """The number of the click whose marker starts at `frame`, if one does."""
        number, rest = divmod(frame, self.interval)
        return number if rest == 0 and number > 0 else None

    def _pulses(self, number: int) -> list[tuple[int, int]]:
        """Where click `number`'s pulses are, as (first frame, frame after) from its onset."""
        ms = self._ms
        spans = [(0, round(MARKER_MS * ms))]
        for slot, on in enumerate(click_slots(number % (1 << CLICK_BITS))):
            if on:
                start = round((FIRST_SLOT_MS + slot * SLOT_MS) * ms)
                spans.append((start, start + round(BIT_PULSE_MS * ms)))
        return spans

    def frames(self, first: int, count: int) -> bytes:
        """PCM for frames [first, first + count), every channel the same."""
        rate = self.format.rate
        start = first % rate
        mono = array.array(self._typecode)
        while len(mono) < count:
            take = min(count - len(mono), rate - start)
            mono.extend(self._tone[start : start + take])
            start = 0
        # Clicks that reach into this stretch (one may have begun in the chunk before).
        end = first + count
        onset = (max(first - self.interval, 0) // self.interval) * self.interval
        while onset < end:
            number = self.click_at(onset)
            if number is not None:
                for a, b in self._pulses(number):
                    lo, hi = max(onset + a, first), min(onset + b, end)
                    for i in range(lo - first, hi - first):
                        mono[i] = self._pulse
            onset += self.interval
        if self.format.channels == 1:
            samples = mono
        else:
            samples = array.array(self._typecode, bytes(len(mono) * 2 * mono.itemsize))
            samples[0::2] = mono
            samples[1::2] = mono
        if sys.byteorder == "big":  # pragma: no cover - the PCM on the wire is little-endian
            samples.byteswap()
        return samples.tobytes()


# ---------------------------------------------------------------------------
# The test RFB server
# ---------------------------------------------------------------------------


@dataclass
class Condition:
    """How the server sends: `jitter` (s) holds chunks back; `skew` speeds its clock."""

    name: str
    jitter: float = 0.0
    skew: float = 0.0

    def describe(self) -> str:
        parts = []
        if self.jitter:
            parts.append(f"jitter {self.jitter * 1000:.0f} ms")
        if self.skew:
            parts.append(f"skew {self.skew * 100:+.0f} %")
        return ", ".join(parts) or "steady"


CONDITIONS = (
    Condition("steady"),
    Condition("jitter", jitter=0.030),
    Condition("skew+1%", skew=0.01),
    Condition("skew-1%", skew=-0.01),
)
SOAK = Condition("soak", jitter=0.030, skew=0.01)


class _AudioClient(asyncio.Protocol):
    """One client of `AudioServer`: the RFB handshake, then audio on request."""

    def __init__(self, server: AudioServer) -> None:
        self.server = server
        self.connection = ServerConnection(ServerSecurity(allow_none=True))
        self.transport: asyncio.Transport | None = None
        self.format: AudioFormat | None = None
        self.acked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.clients.add(self)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.connection.receive_data(data)
            for event in self.connection.events():
                self._on_event(event)
        except Exception as error:
            self.server.fail(f"the player broke the protocol: {error}")
            if self.transport is not None:
                self.transport.close()
            return
        self._flush()

    def eof_received(self) -> bool | None:
        with contextlib.suppress(Exception):
            self.connection.receive_data(b"")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.clients.discard(self)
        self.server.client_gone(self)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ClientInitReceived):
            self.connection.send_server_init(64, 48, RGBX8888, "audio bench")
        elif isinstance(event, SetEncodings):
            if Encoding.QEMU_AUDIO in event.encodings and not self.acked:
                # QEMU's acknowledgement: one rectangle of the pseudo-encoding, no body.
                header = RectangleHeader(0, 0, 64, 48, Encoding.QEMU_AUDIO)
                update = FramebufferUpdate((Rectangle(header, b""),))
                self.connection.send_raw(update.serialize())
                self.acked = True
        elif isinstance(event, QemuAudioSetFormat):
            self.format = event.format
        elif isinstance(event, QemuAudioEnable):
            self.server.enabled(self, self.format or AudioFormat())
        elif isinstance(event, QemuAudioDisable):
            self.server.disabled(self)
        elif isinstance(event, ClientClosed):
            pass

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush(self) -> None:
        self.write(self.connection.data_to_send())


class AudioServer:
    """A VNC server on a Unix socket that plays `Signal` to its one audio client.

    `await stream(seconds)` waits for a client to enable audio, sends BEGIN, then
    `seconds` of the signal (on the sender's clock) in 10 ms chunks under the
    condition's jitter and skew, then END. It records when each click's chunk
    was written (`sent`, monotonic seconds by click number).
    """

    def __init__(self, path: Path, condition: Condition, seed: int = 1) -> None:
        self.path = path
        self.condition = condition
        self.random = random.Random(seed)
        self.clients: set[_AudioClient] = set()
        self.sent: dict[int, float] = {}
        self.began = 0.0
        self.ended = 0.0
        self.format: AudioFormat | None = None
        self.error: str | None = None
        self.chunks = 0
        #: How late each write was (s) against when it was due: its chunk's
        #: time, or under jitter its release time. The server's own pacing error.
        self.late: list[float] = []
        self._server: asyncio.Server | None = None
        self._enabled: asyncio.Future[tuple[_AudioClient, AudioFormat]] | None = None
        self._client: _AudioClient | None = None
        self._gone = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._enabled = loop.create_future()
        self._server = await loop.create_unix_server(lambda: _AudioClient(self), str(self.path))

    def fail(self, reason: str) -> None:
        self.error = self.error or reason
        if self._enabled is not None and not self._enabled.done():
            self._enabled.set_exception(BenchError(reason))

    def enabled(self, client: _AudioClient, fmt: AudioFormat) -> None:
        if self._enabled is not None and not self._enabled.done():
            self._enabled.set_result((client, fmt))

    def disabled(self, client: _AudioClient) -> None:
        if client is self._client:
            self.fail("the player disabled audio during the run")

    def client_gone(self, client: _AudioClient) -> None:
        if client is self._client or self._client is None:
            self._gone.set()
            if self._client is None:
                self.fail("the player left before enabling audio")

    async def stream(self, seconds: float, timeout: float, on_begin: Callable[[], None]) -> None:
        assert self._enabled is not None
        async with asyncio.timeout(timeout):
            client, fmt = await self._enabled
        self._client, self.format = client, fmt
        signal_ = Signal(fmt)
        per_chunk = round(fmt.rate * CHUNK_SECONDS)
        chunks = round(seconds / CHUNK_SECONDS)
        jitter, skew = self.condition.jitter, self.condition.skew
        pending: list[tuple[int, bytes]] = []

        on_begin()
        client.write(audio_server_message(QemuAudioServerOp.BEGIN))
        start = time.monotonic()
        self.began = start
        release = start + self.random.uniform(0, jitter) if jitter else 0.0
        index = 0
        while index < chunks and not self._gone.is_set():
            due = start + (index + 1) * CHUNK_SECONDS / (1 + skew)
            wake = min(due, release) if jitter else due
            delay = wake - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            while index < chunks and start + (index + 1) * CHUNK_SECONDS / (1 + skew) <= now:
                first = index * per_chunk
                pending.append(
                    (first, AudioData(signal_.frames(first, per_chunk), fmt).serialize())
                )
                index += 1
            if pending and (not jitter or now >= release or index >= chunks):
                written = time.monotonic()
                self.late.append(written - (min(due, release) if jitter else due))
                client.write(b"".join(message for _, message in pending))
                for first, _ in pending:
                    onset = -(-first // signal_.interval) * signal_.interval
                    number = signal_.click_at(onset)
                    if number is not None and onset < first + per_chunk:
                        self.sent[number] = written
                self.chunks += len(pending)
                pending.clear()
            if jitter and now >= release:
                release = now + self.random.uniform(0, jitter)
        client.write(audio_server_message(QemuAudioServerOp.END))
        self.ended = time.monotonic()

    async def close(self) -> None:
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()


# ---------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------


class Recorder(asyncio.SubprocessProtocol):
    """`parec` of one sink's monitor: the raw PCM, and when each read came.

    Not `resourced.demo.soundserver.Recorder`: here each read is time-stamped in
    the pipe's callback itself, with no task wake-up between, and watched as it
    comes for the end of the sound (the run's tail).
    """

    def __init__(self) -> None:
        self.data = bytearray()
        #: (monotonic time of the read, bytes received so far after it).
        self.reads: list[tuple[float, int]] = []
        self.last_sound = 0.0
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.stderr = bytearray()
        self.started = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        now = time.monotonic()
        if fd == 2:
            self.stderr += data
            return
        self.data += data
        self.reads.append((now, len(self.data)))
        self.started.set()
        # Cheap check for sound in this read: any sample of channel 0 not quiet.
        start = (len(self.data) - len(data)) // RECORD_FRAME * RECORD_FRAME
        if bytes(self.data[start + 1 :: RECORD_FRAME]).translate(_QUIET).strip(b"q"):
            self.last_sound = now

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


async def start_recorder(
    server: str, sink: str, env: dict[str, str], latency_ms: int = RECORD_LATENCY_MS
) -> tuple[asyncio.SubprocessTransport, Recorder]:
    loop = asyncio.get_running_loop()
    transport, recorder = await loop.subprocess_exec(
        Recorder,
        "parec",
        f"--server={server}",
        f"--device={sink}.monitor",
        "--format=s16le",
        f"--rate={RECORD_RATE}",
        f"--channels={RECORD_CHANNELS}",
        f"--latency-msec={latency_ms}",
        "--raw",
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    return transport, recorder


# ---------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------


@dataclass
class Heard:
    """What the recording holds: clicks (number -> monotonic time) and gaps."""

    clicks: dict[int, float] = field(default_factory=dict)
    click_frames: dict[int, int] = field(default_factory=dict)  # where each marker starts
    undecoded: int = 0
    dropouts: list[float] = field(default_factory=list)  # ms each
    dropout_times: list[float] = field(default_factory=list)  # monotonic, where each began
    dropout_frames: list[int] = field(default_factory=list)  # where each began
    first_sound: float | None = None
    last_sound: float | None = None


def sample_times(reads: list[tuple[float, int]], rate: int) -> Callable[[int], float]:
    """Frame index -> monotonic time at which it came out of the sink (see the module docstring)."""
    ends = [n // RECORD_FRAME for _, n in reads]

    def at(frame: int) -> float:
        k = bisect.bisect_right(ends, frame)
        if k >= len(reads):
            k = len(reads) - 1
        best = reads[k][0] - (ends[k] - frame) / rate
        limit = reads[k][0] + 0.1
        for t, n in reads[k + 1 :]:
            if t > limit:
                break
            best = min(best, t - (n // RECORD_FRAME - frame) / rate)
        return best

    return at


def analyse(data: bytes, reads: list[tuple[float, int]]) -> Heard:
    """Find the clicks and the drop-outs in a recording (s16le stereo, channel 0 used)."""
    heard = Heard()
    if not reads:
        return heard
    rate = RECORD_RATE
    ms = rate / 1000
    at = sample_times(reads, rate)
    high = bytes(data[1::RECORD_FRAME])
    quiet = high.translate(_QUIET)
    loud = high.translate(_LOUD)

    first = len(quiet) - len(quiet.lstrip(b"q"))
    if first == len(quiet):
        return heard  # nothing but silence
    last = len(quiet.rstrip(b"q")) - 1
    heard.first_sound, heard.last_sound = at(first), at(last)
    longest_quiet = round(DROPOUT_MS * ms)
    for match in re.finditer(rb"q{%d,}" % (longest_quiet + 1), quiet, flags=0):
        if first < match.start() and match.end() <= last:
            heard.dropouts.append((match.end() - match.start()) / ms)
            heard.dropout_times.append(at(match.start()))
            heard.dropout_frames.append(match.start())

    # Pulses: runs of loud samples, joined across dips shorter than 0.3 ms
    # (a resampler rings at a pulse's edges).
    runs: list[tuple[int, int]] = []
    join = round(0.3 * ms)
    for match in re.finditer(rb"L+", loud):
        if runs and match.start() - runs[-1][1] <= join:
            runs[-1] = (runs[-1][0], match.end())
        else:
            runs.append((match.start(), match.end()))
    span = round(CLICK_SPAN_MS * (1 + MAX_SPEED_ERROR) * ms)
    for index, (start, end) in enumerate(runs):
        if not 2.0 <= (end - start) / ms <= 4.5:
            continue  # not a marker
        pulses = []
        for a, b in runs[index + 1 :]:
            if a >= start + span:
                break
            pulses.append(((a - start) / ms, (b - a) / ms))
        number = decode_click(pulses)
        if number is None:
            heard.undecoded += 1
            continue
        if number not in heard.clicks:
            heard.clicks[number] = at(start)
            heard.click_frames[number] = start
    return heard


def decode_click(pulses: list[tuple[float, float]]) -> int | None:
    """The number a click's pulses spell, from (offset after the marker, length) in ms.

    A player that corrects clock skew by resampling (resourced's does, by up to
    a few %) stretches or squeezes the click: the slots are matched at the
    speed, within +-6 %, that puts every pulse nearest to a slot's start.
    """
    if not pulses or any(not 0.5 <= length <= 2.0 for _, length in pulses):
        return None
    best: tuple[float, list[int]] | None = None
    steps = round(MAX_SPEED_ERROR / 0.0025)
    for step in range(-steps, steps + 1):
        speed = 1 + step * 0.0025
        positions = [(offset / speed - FIRST_SLOT_MS) / SLOT_MS for offset, _ in pulses]
        error = max(abs(p - round(p)) for p in positions)
        if best is None or error < best[0]:
            best = (error, [round(p) for p in positions])
    assert best is not None
    error, slots = best
    if (
        error > 0.25
        or len(set(slots)) != len(slots)
        or not all(0 <= i < CLICK_SLOTS for i in slots)
    ):
        return None
    on = [i in slots for i in range(CLICK_SLOTS)]
    number = sum(1 << i for i, bit in enumerate(on[:CLICK_BITS]) if bit)
    return number if number and on == click_slots(number) else None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


@dataclass
class PlayerRun:
    """One player under one condition: the figures, or why there are none."""

    player: str
    condition: str
    seconds: float
    error: str | None = None
    clicks_sent: int = 0
    clicks_heard: int = 0
    undecoded: int = 0
    latency_ms: list[float] = field(default_factory=list)
    latency_at: list[float] = field(default_factory=list)  # s after BEGIN, per latency
    dropouts_ms: list[float] = field(default_factory=list)
    dropouts_at: list[float] = field(default_factory=list)  # s after BEGIN, per drop-out
    underruns: int | None = None
    player_latency_usec: float | None = None
    player_latency_series: list[float] = field(default_factory=list)  # us, every 100 ms
    cpu_percent: float | None = None
    format: str = ""
    server_late_ms: list[float] = field(default_factory=list)
    #: Playback speed against the sender's, in % off, between two clicks in a row
    #: with no drop-out between them: what resampling does to the pitch.
    speed_pct: list[float] = field(default_factory=list)
    speed_at: list[float] = field(default_factory=list)  # s after BEGIN, per speed

    def p(self, fraction: float) -> float | None:
        return percentile(self.latency_ms, fraction) if self.latency_ms else None

    @property
    def drift_ms_per_min(self) -> float | None:
        if len(self.latency_ms) < 3:
            return None
        slope = statistics.linear_regression(self.latency_at, self.latency_ms).slope
        return slope * 60

    @property
    def first_ms(self) -> float | None:
        return statistics.median(self.latency_ms[:3]) if self.latency_ms else None

    @property
    def last_ms(self) -> float | None:
        return statistics.median(self.latency_ms[-3:]) if self.latency_ms else None

    def summary(self) -> dict[str, Any]:
        def r(value: float | None, digits: int = 1) -> float | None:
            return None if value is None else round(value, digits)

        if self.error is not None:
            return {"error": self.error}
        return {
            "format": self.format,
            "seconds": self.seconds,
            "clicks_sent": self.clicks_sent,
            "clicks_heard": self.clicks_heard,
            "clicks_undecoded": self.undecoded,
            "latency_p50_ms": r(self.p(0.5)),
            "latency_p99_ms": r(self.p(0.99)),
            "latency_first_ms": r(self.first_ms),
            "latency_last_ms": r(self.last_ms),
            "drift_ms_per_min": r(self.drift_ms_per_min),
            "dropouts": len(self.dropouts_ms),
            "dropouts_total_ms": r(sum(self.dropouts_ms)),
            "dropout_longest_ms": r(max(self.dropouts_ms, default=0.0)),
            "dropouts_at_s": [round(t, 3) for t in self.dropouts_at],
            "speed_series_pct": [
                [round(t, 3), round(v, 2)]
                for t, v in zip(self.speed_at, self.speed_pct, strict=True)
            ],
            "player_latency_series_ms": [round(v / 1000, 1) for v in self.player_latency_series],
            "latency_series_ms": [
                [round(t, 3), round(v, 1)]
                for t, v in zip(self.latency_at, self.latency_ms, strict=True)
            ],
            "speed_min_pct": r(min(self.speed_pct), 2) if self.speed_pct else None,
            "speed_max_pct": r(max(self.speed_pct), 2) if self.speed_pct else None,
            "underruns": self.underruns,
            "player_latency_usec": r(self.player_latency_usec, 0),
            "cpu_percent": r(self.cpu_percent, 2),
            "server_late_p99_ms": r(percentile(self.server_late_ms, 0.99), 2)
            if self.server_late_ms
            else None,
        }


# ---------------------------------------------------------------------------
# Sound servers
# ---------------------------------------------------------------------------


class SoundServer:
    """A private PulseAudio or PipeWire for one run (`resourced.demo.soundserver`).

    Its own null sink is left alone: each player gets one of its own
    (`add_null_sink`), in the recording's format.
    """

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.private = (
            PrivatePulseAudio(directory) if kind == PULSEAUDIO else PrivatePipeWire(directory)
        )
        self.version = ""

    @property
    def server(self) -> str:
        return self.private.server

    @property
    def env(self) -> dict[str, str]:
        """An environment whose clients reach this server only."""
        return self.private.client_env()

    async def pactl(self, *args: str) -> str:
        return await self.private.pactl(*args)

    async def start(self) -> None:
        await self.private.start()
        info = dict(line.partition(":")[::2] for line in (await self.pactl("info")).splitlines())
        name = info.get("Server Name", "").strip()
        version = info.get("Server Version", "").strip()
        # pipewire-pulse names itself "PulseAudio (on PipeWire 0.3.65)".
        self.version = name if "PipeWire" in name else f"{name} {version}"

    async def stop(self) -> None:
        await self.private.stop()


async def add_null_sink(sound: SoundServer, name: str) -> None:
    args = [
        "load-module",
        "module-null-sink",
        f"sink_name={name}",
        f"rate={RECORD_RATE}",
        f"channels={RECORD_CHANNELS}",
        "format=s16le",
    ]
    if sound.kind == PULSEAUDIO:
        # Without it the null sink runs at about 2 s latency with rewinds (ENVIRONMENT.md).
        args.append("norewinds=1")
    await sound.pactl(*args)


# ---------------------------------------------------------------------------
# Players
# ---------------------------------------------------------------------------


def player_command(player: str, socket_path: Path) -> list[str]:
    if player == GTKVNC:
        return [str(SYSTEM_PYTHON), str(GTKVNC_PLAYER), str(socket_path)]
    if player == FLOOR:
        return [str(VENV_PYTHON), str(RESOURCED_PLAYER), "--floor", str(socket_path)]
    return [str(VENV_PYTHON), str(RESOURCED_PLAYER), str(socket_path)]


def player_unavailable(player: str) -> str | None:
    """Why `player` cannot run here, or None."""
    if player == GTKVNC:
        probe = [
            str(SYSTEM_PYTHON),
            "-c",
            "import gi; gi.require_version('GVnc', '1.0'); gi.require_version('GVncPulse', '1.0');"
            "from gi.repository import GVnc, GVncPulse",
        ]
        what = "gtk-vnc from Debian's python3 (python3-gi, gir1.2-gtk-vnc-2.0)"
    else:
        probe = [str(VENV_PYTHON), "-c", "import resourced.sinks.pulse"]
        what = "resourced.sinks.pulse (the PulseAudio sink)"
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
    except OSError as error:
        return f"{what}: {error}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"{what} not importable: {lines[-1] if lines else result.returncode}"
    return None


async def run_player(
    player: str,
    condition: Condition,
    seconds: float,
    sound: SoundServer,
    sink: str,
    workdir: Path,
    seed: int,
    keep: bool = False,
    record_latency_ms: int = RECORD_LATENCY_MS,
) -> PlayerRun:
    """Play `seconds` of the signal through `player` under `condition`; measure it."""
    result = PlayerRun(player, condition.name, seconds)
    tag = f"{player}-{condition.name}-{seed}".replace("%", "pct").replace("+", "plus")
    socket_path = workdir / f"{tag}.sock"
    server = AudioServer(socket_path, condition, seed)
    await server.start()
    env = dict(sound.env, PULSE_SERVER=sound.server, PULSE_SINK=sink)
    # A default sink too: a client may ask for a device of its own choosing.
    await sound.pactl("set-default-sink", sink)
    transport, recorder = await start_recorder(sound.server, sink, env, record_latency_ms)
    process: asyncio.subprocess.Process | None = None
    cpu: list[float] = []
    stderr_path = workdir / f"{tag}.stderr"
    try:
        # Let parec start (its stream connected) before anything plays.
        try:
            async with asyncio.timeout(10):
                await recorder.started.wait()
        except TimeoutError:
            raise BenchError(
                f"parec recorded nothing from {sink}.monitor within 10 s: "
                f"{recorder.stderr.decode(errors='replace').strip()}"
            ) from None
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *player_command(player, socket_path),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                cwd=ROOT,
            )
        pid = process.pid

        def begin() -> None:
            cpu.append(cpu_seconds(pid))

        waiting = asyncio.ensure_future(process.wait())
        streaming = asyncio.ensure_future(server.stream(seconds, 30.0, begin))
        await asyncio.wait({waiting, streaming}, return_when=asyncio.FIRST_COMPLETED)
        if not streaming.done():
            streaming.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await streaming
            raise BenchError(f"the player exited ({process.returncode}) during the run")
        streaming.result()
        with contextlib.suppress(OSError):
            cpu.append(cpu_seconds(pid))
        # The tail: until the sink has been silent for half a second.
        cap = time.monotonic() + 10 + 0.02 * seconds
        while time.monotonic() < cap:
            now = time.monotonic()
            if now - server.ended > 0.5 and now - recorder.last_sound > 0.5:
                break
            await asyncio.sleep(0.05)
        await server.close()
        try:
            async with asyncio.timeout(15):
                out, _ = await process.communicate()
        except TimeoutError:
            process.terminate()
            out, _ = await process.communicate()
        report = parse_report(out)
    except (BenchError, TimeoutError, OSError) as error:
        result.error = str(error) or type(error).__name__
        if server.error:
            result.error = f"{result.error} ({server.error})"
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        if tail:
            result.error += ": " + " | ".join(tail)
        return result
    finally:
        await server.close()
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        transport.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await recorder.exited
        transport.close()

    if report.get("errors"):
        log(f"{player}: the player reported {report['errors']}")
    heard = analyse(bytes(recorder.data), recorder.reads)
    if keep:
        # For a closer look: the recording, and when each read came.
        (workdir / f"{tag}.s16le").write_bytes(recorder.data)
        (workdir / f"{tag}.reads.json").write_text(json.dumps(recorder.reads))
    assert server.format is not None
    result.format = str(server.format)
    result.clicks_sent = len(server.sent)
    result.server_late_ms = [late * 1000 for late in server.late]
    result.undecoded = heard.undecoded
    result.dropouts_ms = heard.dropouts
    result.dropouts_at = [t - server.began for t in heard.dropout_times]
    for number, sent in sorted(server.sent.items()):
        at = heard.clicks.get(number)
        if at is not None and at <= sent:
            result.undecoded += 1  # heard before it was sent: a click misread
        elif at is not None:
            result.latency_ms.append((at - sent) * 1000)
            result.latency_at.append(sent - server.began)
    result.clicks_heard = len(result.latency_ms)
    frames = heard.click_frames
    for number in sorted(frames):
        after = frames.get(number + 1)
        if after is None:
            continue
        if any(frames[number] < f < after for f in heard.dropout_frames):
            continue  # the silence of a drop-out is not a speed
        heard_seconds = (after - frames[number]) / RECORD_RATE
        result.speed_pct.append((CLICK_INTERVAL / heard_seconds - 1) * 100)
        result.speed_at.append(server.sent[number] - server.began if number in server.sent else 0)
    if len(cpu) == 2 and server.ended > server.began:
        result.cpu_percent = (cpu[1] - cpu[0]) / (server.ended - server.began) * 100
    result.underruns = report.get("underruns")
    latencies = report.get("latency_usec")
    if latencies:
        result.player_latency_usec = statistics.median(latencies)
        result.player_latency_series = [float(v) for v in latencies]
    return result


def parse_report(out: bytes) -> dict[str, Any]:
    for line in reversed(out.decode(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            document = json.loads(line)
            if isinstance(document, dict):
                return document
    return {}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


@dataclass
class Options:
    servers: tuple[str, ...] = (PULSEAUDIO, PIPEWIRE)
    players: tuple[str, ...] = PLAYERS
    conditions: tuple[Condition, ...] = CONDITIONS
    seconds: float = 60.0
    keep_workdir: bool = False
    record_latency_ms: int = RECORD_LATENCY_MS


@dataclass
class ServerResults:
    kind: str
    version: str = ""
    error: str | None = None
    runs: list[PlayerRun] = field(default_factory=list)


@dataclass
class Results:
    options: Options
    unavailable: dict[str, str] = field(default_factory=dict)
    servers: list[ServerResults] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seconds_per_condition": self.options.seconds,
            "record_latency_ms": self.options.record_latency_ms,
            "conditions": {c.name: c.describe() for c in self.options.conditions},
            "unavailable": self.unavailable,
            "servers": {},
        }
        for server in self.servers:
            entry: dict[str, Any] = {"version": server.version}
            if server.error:
                entry["error"] = server.error
            for run in server.runs:
                entry.setdefault(run.condition, {})[run.player] = run.summary()
            for player, reason in self.unavailable.items():
                for condition in self.options.conditions:
                    entry.setdefault(condition.name, {})[player] = {
                        "error": f"not available: {reason}"
                    }
            out["servers"][server.kind] = entry
        return out


async def run_server(kind: str, options: Options, workdir: Path, results: Results) -> None:
    entry = ServerResults(kind)
    results.servers.append(entry)
    directory = workdir / kind
    directory.mkdir()
    sound = SoundServer(kind, directory)
    players = [p for p in options.players if p not in results.unavailable]
    try:
        log(f"{kind}: starting")
        await sound.start()
        entry.version = sound.version
        sinks = {player: f"bench_{player.replace('-', '')}" for player in players}
        for sink in sinks.values():
            await add_null_sink(sound, sink)
        for index, condition in enumerate(options.conditions):
            # Alternate who goes first, condition by condition.
            order = players if index % 2 == 0 else players[::-1]
            for player in order:
                if player == FLOOR and index > 0:
                    continue  # its CPU hardly depends on the condition: once is enough
                log(f"{kind}: {player}, {condition.describe()}, {options.seconds:g} s")
                run = await run_player(
                    player,
                    condition,
                    options.seconds,
                    sound,
                    sinks[player],
                    directory,
                    index + 1,
                    options.keep_workdir,
                    options.record_latency_ms,
                )
                if run.error:
                    log(f"{kind}: {player}: {run.error}")
                entry.runs.append(run)
    except (BenchError, SoundServerError) as error:
        entry.error = str(error)
        log(f"{kind}: {error}")
    finally:
        await sound.stop()


async def run_benchmark(options: Options) -> Results:
    results = Results(options)
    for player in options.players:
        reason = await asyncio.to_thread(player_unavailable, player)
        if reason is not None:
            log(f"{player}: not available: {reason}")
            results.unavailable[player] = reason
    workdir = Path(tempfile.mkdtemp(prefix="audio-bench-"))
    try:
        for kind in options.servers:
            await run_server(kind, options, workdir, results)
    finally:
        if options.keep_workdir:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Results) -> str:
    lines: list[str] = []
    options = results.options
    for server in results.servers:
        lines.append(
            f"{server.kind} ({server.version or 'did not start'}), "
            f"{options.seconds:g} s per condition, a private null sink per player, "
            f"recorded at {options.record_latency_ms} ms"
        )
        if server.error:
            lines.append(f"  failed: {server.error}")
        header = (
            f"  {'condition':<22} {'player':<10} {'clicks':>9} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'first ms':>8} {'last ms':>8} {'ms/min':>8} {'drop-outs':>9} {'total ms':>9} "
            f"{'longest':>8} {'speed %':>12} {'underruns':>9} {'CPU %':>6}"
        )
        lines.append(header)
        for condition in options.conditions:
            for player in options.players:
                label = condition.describe()
                if player in results.unavailable:
                    lines.append(
                        f"  {label:<22} {player:<10} not available: {results.unavailable[player]}"
                    )
                    continue
                run = next(
                    (
                        r
                        for r in server.runs
                        if r.player == player and r.condition == condition.name
                    ),
                    None,
                )
                if run is None:
                    continue
                if run.error:
                    lines.append(f"  {label:<22} {player:<10} failed: {run.error}")
                    continue
                if player == FLOOR:
                    note = "(no sound: our client receives and parses, drops the rest)"
                    cpu = _f(run.cpu_percent, ".2f")
                    lines.append(f"  {label:<22} {player:<10} {note:<121} {cpu:>6}")
                    continue
                clicks = f"{run.clicks_heard}/{run.clicks_sent}"
                speed = (
                    f"{min(run.speed_pct):+.1f}..{max(run.speed_pct):+.1f}"
                    if run.speed_pct
                    else "-"
                )
                lines.append(
                    f"  {label:<22} {player:<10} {clicks:>9} {_f(run.p(0.5), '.1f'):>7} "
                    f"{_f(run.p(0.99), '.1f'):>7} {_f(run.first_ms, '.1f'):>8} "
                    f"{_f(run.last_ms, '.1f'):>8} {_f(run.drift_ms_per_min, '+.1f'):>8} "
                    f"{len(run.dropouts_ms):>9} {sum(run.dropouts_ms):>9.1f} "
                    f"{max(run.dropouts_ms, default=0.0):>8.1f} {speed:>12} "
                    f"{'-' if run.underruns is None else run.underruns:>9} "
                    f"{_f(run.cpu_percent, '.2f'):>6}"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Run from the repository root. See bench/README.md.",
    )
    parser.add_argument("--short", action="store_true", help="4 s per condition (for CI)")
    parser.add_argument("--seconds", type=float, help="seconds per condition (default 60)")
    parser.add_argument(
        "--minutes", type=float, help="instead: one soak of jitter 30 ms and skew +1 %% this long"
    )
    parser.add_argument("--server", choices=(PULSEAUDIO, PIPEWIRE, "both"), default="both")
    parser.add_argument(
        "--player",
        choices=(*PLAYERS, "both", "all"),
        default="all",
        help="both: gtk-vnc and resourced; all (the default): also resourced-floor, "
        "in the first condition only, and not in a soak",
    )
    parser.add_argument(
        "--condition",
        action="append",
        choices=[c.name for c in CONDITIONS],
        help="only these conditions (repeatable)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--record-latency-ms",
        type=int,
        default=RECORD_LATENCY_MS,
        metavar="MS",
        help="parec's latency (default %(default)s); on PipeWire it caps the graph's quantum",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> Options:
    options = Options()
    options.servers = (PULSEAUDIO, PIPEWIRE) if args.server == "both" else (args.server,)
    if args.player == "all":
        options.players = (GTKVNC, RESOURCED) if args.minutes is not None else PLAYERS
    elif args.player == "both":
        options.players = (GTKVNC, RESOURCED)
    else:
        options.players = (args.player,)
    if args.minutes is not None:
        options.conditions = (SOAK,)
        options.seconds = args.minutes * 60
    else:
        if args.condition:
            options.conditions = tuple(c for c in CONDITIONS if c.name in args.condition)
        options.seconds = 4.0 if args.short else 60.0
        if args.seconds is not None:
            options.seconds = args.seconds
    if not options.seconds > 1:
        raise SystemExit("a run needs more than a second")
    options.keep_workdir = args.keep
    if not 1 <= args.record_latency_ms <= 1000:
        raise SystemExit("--record-latency-ms must be within 1-1000")
    options.record_latency_ms = args.record_latency_ms
    return options


async def run_until_signal(options: Options) -> Results:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await run_benchmark(options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    try:
        results = asyncio.run(run_until_signal(options))
    except asyncio.CancelledError:
        log("interrupted; everything started was stopped")
        return 130
    print(format_table(results), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(results.to_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
