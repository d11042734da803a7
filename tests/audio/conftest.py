"""Fixtures for the audio tests: a real sound server per test, PulseAudio and PipeWire.

`sound_server` is parametrized over both servers (each test its own directory
and processes); `pulse` is a connected `PulseServer` on it. A server that cannot
be started fails the test, naming what is missing.

Helpers: `tone_chunk` makes PCM of a sine in any QEMU format, `feed` plays it in
real time in chunks, `dropouts` / `tone_span` look at a recording.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import math
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from resourced.audio import AudioFormat, SampleFormat
from resourced.demo.soundserver import (
    RECORD_FORMAT,
    PrivatePipeWire,
    PrivatePulseAudio,
    SoundServerError,
)
from resourced.playout import PlayoutConfig
from resourced.sinks.pulse import PulsePlayback, PulseServer

SERVERS = {"pulseaudio": PrivatePulseAudio, "pipewire": PrivatePipeWire}
ServerType = PrivatePulseAudio | PrivatePipeWire
FREQUENCY = 440.0
AMPLITUDE = 0.5  # of full scale


@pytest.fixture(params=sorted(SERVERS))
async def sound_server(request: pytest.FixtureRequest) -> AsyncIterator[ServerType]:
    # A short directory: the sockets' paths must fit in sun_path.
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="snd-"))
    server = SERVERS[request.param](directory)
    try:
        try:
            await server.start()
        except SoundServerError as error:
            pytest.fail(f"no {server.kind} to test against: {error}", pytrace=False)
        yield server
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


# The tests feed and play in one process on a 2-core machine shared with other
# test runs: a stall of the test's own loop longer than the buffer is a real
# underrun that says nothing about the player. They start with 100 ms (instead
# of 50 ms) so the first seconds, when the jitter is not yet known, ride that out.
TEST_CONFIG = PlayoutConfig(initial_jitter=0.080)


class _TestPulseServer(PulseServer):
    def playback(self, name: str, **kwargs: Any) -> PulsePlayback:
        kwargs.setdefault("config", TEST_CONFIG)
        return super().playback(name, **kwargs)


@pytest.fixture
async def pulse(sound_server: ServerType) -> AsyncIterator[PulseServer]:
    client = _TestPulseServer(sound_server.server)
    await client.start()
    try:
        await wait_for(lambda: client.connected, 10, "the PulseServer to connect")
        yield client
    finally:
        await client.close()


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until true; fail the test after `timeout` seconds.

    Polled on purpose: the conditions are the player's state, changed by
    libpulse callbacks and the sound server, with no event to await.
    """
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


def tone_chunk(
    fmt: AudioFormat,
    start: int,
    frames: int,
    frequency: float = FREQUENCY,
    amplitude: float = AMPLITUDE,
) -> bytes:
    """`frames` frames of a sine from frame `start` on, in `fmt` (same on all channels)."""
    sample = fmt.sample_format
    full = sample.full_scale - 1
    offset = 0 if sample.signed else sample.full_scale
    step = 2 * math.pi * frequency / fmt.rate
    values = [
        round(amplitude * full * math.sin(step * (start + i))) + offset for i in range(frames)
    ]
    if fmt.channels == 2:
        values = [v for v in values for _ in range(2)]
    data = array.array(sample.typecode, values)
    if sys.byteorder == "big":
        data.byteswap()
    return data.tobytes()


async def feed(
    playback: PulsePlayback,
    fmt: AudioFormat,
    seconds: float,
    *,
    start: int = 0,
    chunk_ms: float = 10.0,
    pace: float = 1.0,
) -> int:
    """Write `seconds` of tone in chunks on a real-time schedule; the next frame.

    `pace` < 1 sends slower than real time (a starved stream).
    """
    loop = asyncio.get_running_loop()
    frames = max(1, round(fmt.rate * chunk_ms / 1000))
    began = loop.time()
    frame = start
    count = round(seconds * 1000 / chunk_ms)
    for i in range(count):
        playback.write(tone_chunk(fmt, frame, frames))
        frame += frames
        delay = began + (i + 1) * (chunk_ms / 1000) / pace - loop.time()
        await asyncio.sleep(max(0.0, delay))
    return frame


def left(data: bytes) -> array.array[int]:
    """The first channel of a recording (RECORD_FORMAT) as integers."""
    values = array.array("h")
    values.frombytes(data[: len(data) - len(data) % RECORD_FORMAT.frame_size])
    if sys.byteorder == "big":
        values.byteswap()
    return values[:: RECORD_FORMAT.channels]


def tone_span(samples: array.array[int], level: float = 0.1) -> tuple[int, int] | None:
    """First and last sample louder than `level` of full scale, or None if silent."""
    threshold = level * 32767
    loud = [i for i, v in enumerate(samples) if abs(v) > threshold]
    return (loud[0], loud[-1]) if loud else None


def dropouts(samples: array.array[int], min_frames: int = 48) -> list[tuple[int, int]]:
    """Stretches (start, length) of `min_frames` or more near-silent samples.

    A 440 Hz sine at half scale stays below 2 % of its peak for less than one
    sample at 48 kHz around each zero crossing, so any such stretch of 1 ms is a
    gap in the sound.
    """
    threshold = 0.02 * AMPLITUDE * 32767
    gaps: list[tuple[int, int]] = []
    run_start = -1
    for i, v in enumerate(samples):
        if abs(v) < threshold:
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            if i - run_start >= min_frames:
                gaps.append((run_start, i - run_start))
            run_start = -1
    if run_start >= 0 and len(samples) - run_start >= min_frames:
        gaps.append((run_start, len(samples) - run_start))
    return gaps


@contextlib.asynccontextmanager
async def running(coro: object) -> AsyncIterator[asyncio.Task[object]]:
    """Run a coroutine as a task for the block; cancel it after if still running."""
    task: asyncio.Task[object] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


S16_STEREO = AudioFormat(SampleFormat.S16, 2, 44100)
