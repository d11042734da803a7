"""A sink that records PCM into a WAV file.

WAV stores 8-bit samples unsigned and wider ones signed, so formats that differ
(S8, U16, U32) are converted on the way in. This module writes files only; it does
not play anything.
"""

from __future__ import annotations

import array
import sys
import wave
from pathlib import Path

from resourced.audio import AudioFormat, SampleFormat


class WavFileSink:
    """Write interleaved little-endian PCM in `fmt` to a WAV file at `path`."""

    kind = "wav"

    def __init__(self, path: Path | str, fmt: AudioFormat, *, exclusive: bool = False) -> None:
        """Raises OSError if the file cannot be made; FileExistsError if it
        exists and `exclusive`."""
        self.path = Path(path)
        self.format = fmt
        self.bytes_written = 0
        self._partial = b""
        # Opened here, not by wave.open: when wave opens a path that fails, its
        # half-made writer prints a traceback from __del__ (CPython 3.11).
        # Unbuffered, so that a failing write (a full disk) raises in write(),
        # when it happens, not in close() long after: one write() per chunk.
        self._file = open(self.path, "xb" if exclusive else "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(fmt.channels)
        self._wav.setsampwidth(fmt.sample_format.size)
        self._wav.setframerate(fmt.rate)

    def write(self, data: bytes) -> None:
        """Append PCM (any length: a partial frame waits for the rest).

        Raises OSError as the file system reports it (ENOSPC...)."""
        data = self._partial + data
        usable = len(data) - len(data) % self.format.frame_size
        data, self._partial = data[:usable], data[usable:]
        self._wav.writeframesraw(_to_wav_samples(data, self.format.sample_format))
        self.bytes_written += len(data)

    def close(self) -> None:
        """Finish the header (its lengths) and close; raises OSError if that fails."""
        try:
            self._wav.close()
        finally:
            self._file.close()  # wave leaves a file it was given open


def _to_wav_samples(data: bytes, fmt: SampleFormat) -> bytes:
    if fmt in (SampleFormat.U8, SampleFormat.S16, SampleFormat.S32):
        return data
    if fmt is SampleFormat.S8:
        return bytes((b + 128) & 0xFF for b in data)
    # U16/U32: shift to signed by flipping the top bit of each little-endian sample.
    values = array.array("H" if fmt is SampleFormat.U16 else "I")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    top = 1 << (8 * fmt.size - 1)
    flipped = array.array(values.typecode, (v ^ top for v in values))
    if sys.byteorder == "big":
        flipped.byteswap()
    return flipped.tobytes()
