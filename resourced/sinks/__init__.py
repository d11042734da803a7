"""Sinks: where a guest's resources go (fd streams, PTYs, PulseAudio, files).

Every sink is a small class behind the `Sink` protocol: `write(data)`, `close()`
and a `kind` naming the destination. A sink owns its destination and nothing
else; what to send it is decided above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from resourced.audio import AudioFormat


class Sink(Protocol):
    """A destination for a byte stream (audio PCM, console output...)."""

    @property
    def kind(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class AudioSink(Protocol):
    """Where a guest's sound goes: PCM in a format announced by `begin`.

    The RFB side calls `begin(fmt)` when capture starts (the format is known),
    `write(pcm)` for each chunk (interleaved little-endian PCM in that format;
    called on the event loop from the read callback, so it never blocks), and
    `end()` when capture ends or the connection is lost. `close()` releases
    the destination for good.
    """

    @property
    def kind(self) -> str: ...

    def begin(self, fmt: AudioFormat) -> None: ...

    def write(self, pcm: bytes) -> None: ...

    def end(self) -> None: ...

    def close(self) -> None: ...
