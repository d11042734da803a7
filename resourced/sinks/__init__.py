"""Sinks: where a guest's resources go (fd streams, PTYs, PulseAudio, files).

Every sink is a small class behind the `Sink` protocol: `write(data)`, `close()`
and a `kind` naming the destination. A sink owns its destination and nothing
else; what to send it is decided above.
"""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    """A destination for a byte stream (audio PCM, console output...)."""

    @property
    def kind(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...
