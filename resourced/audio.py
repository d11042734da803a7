"""PCM audio as resourced sees it: formats, and measurements of a recording.

`AudioFormat` describes interleaved little-endian PCM (what QEMU sends over VNC).
`analyse()` measures level and pitch of such PCM (RMS, peak, zero-crossing
frequency), used by the probe command and the tests. This module knows nothing of
RFB or PulseAudio and does no I/O.
"""

from __future__ import annotations

import array
import enum
import math
import sys
from dataclasses import dataclass


class SampleFormat(enum.Enum):
    """Sample encodings; all little-endian."""

    U8 = "u8"
    S8 = "s8"
    U16 = "u16"
    S16 = "s16"
    U32 = "u32"
    S32 = "s32"

    @property
    def size(self) -> int:
        return int(self.value[1:]) // 8

    @property
    def signed(self) -> bool:
        return self.value.startswith("s")

    @property
    def typecode(self) -> str:
        return {"u8": "B", "s8": "b", "u16": "H", "s16": "h", "u32": "I", "s32": "i"}[self.value]

    @property
    def full_scale(self) -> int:
        return 1 << (8 * self.size - 1)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """Interleaved PCM: sample format, channel count and frames per second."""

    sample_format: SampleFormat = SampleFormat.S16
    channels: int = 2
    rate: int = 44100

    def __post_init__(self) -> None:
        if self.channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, not {self.channels}")
        if not 1 <= self.rate <= 48000:
            raise ValueError(f"rate must be 1..48000 Hz, not {self.rate}")

    @property
    def frame_size(self) -> int:
        return self.sample_format.size * self.channels

    @property
    def byte_rate(self) -> int:
        return self.frame_size * self.rate

    def __str__(self) -> str:
        return f"{self.sample_format.value} {self.channels}ch {self.rate} Hz"


@dataclass(frozen=True, slots=True)
class AudioMeasurement:
    """Level and pitch of a stretch of PCM (first channel for pitch)."""

    frames: int
    seconds: float
    rms_dbfs: float
    peak_dbfs: float
    frequency_hz: float  # from zero crossings; 0.0 when silent or too short


def samples(data: bytes, fmt: AudioFormat) -> array.array[int]:
    """Decode PCM into signed integers centred on zero (all channels interleaved)."""
    usable = len(data) - len(data) % fmt.frame_size
    values: array.array[int] = array.array(fmt.sample_format.typecode)
    values.frombytes(data[:usable])
    if sys.byteorder == "big":
        values.byteswap()
    if not fmt.sample_format.signed:
        offset = fmt.sample_format.full_scale
        values = array.array("q", (v - offset for v in values))
    return values


def _dbfs(value: float, full_scale: int) -> float:
    if value <= 0:
        return -math.inf
    return 20 * math.log10(value / full_scale)


def analyse(data: bytes, fmt: AudioFormat) -> AudioMeasurement:
    """Measure RMS and peak level (all channels) and the first channel's pitch."""
    values = samples(data, fmt)
    frames = len(values) // fmt.channels
    seconds = frames / fmt.rate
    if not values:
        return AudioMeasurement(0, 0.0, -math.inf, -math.inf, 0.0)
    full = fmt.sample_format.full_scale
    rms = math.sqrt(sum(v * v for v in values) / len(values))
    peak = max(abs(v) for v in values)
    first = values[:: fmt.channels]
    # Count sign changes with hysteresis (a tenth of the peak) so that noise
    # around zero does not count as crossings.
    threshold = peak / 10
    crossings = 0
    state = 0
    for v in first:
        if v > threshold and state <= 0:
            if state < 0:
                crossings += 1
            state = 1
        elif v < -threshold and state >= 0:
            if state > 0:
                crossings += 1
            state = -1
    frequency = crossings / 2 / seconds if seconds > 0 and peak > 0 else 0.0
    return AudioMeasurement(frames, seconds, _dbfs(rms, full), _dbfs(peak, full), frequency)
