"""A guest's sound as the broker holds it: capture over the guest's connection,
played into the desktop's sound server and, on request, recorded to a WAV file.

`GuestAudio` rides on the guest's one RFB connection (`GuestLink`): it adds
QEMU's audio extension to every connection the link opens, takes the audio
events the link routes to it (`AudioSupported`, `AudioBegin`, `AudioData`,
`AudioEnd`) and hands the PCM to its sinks: a `Playback` (one stream on the
user's PulseAudio or PipeWire, `resourced.sinks.pulse`) and a WAV recorder
(`resourced.sinks.wav`). Whether sound plays whenever the connection is open
(`AudioSettings.autostart`) or only after `start()` is a setting; `start()` and
`record()` also hold the connection open, so asking for sound connects.

Nothing here knows D-Bus or PulseAudio's API: the player is given as a factory,
observers are told of changes, callers get `resourced.errors` exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from resourced.audio import AudioFormat
from resourced.broker.link import GuestLink
from resourced.errors import ConfigurationError, Unsupported
from resourced.rfb.qemu import AudioBegin, AudioData, AudioEnd, AudioSupported, QemuAudio
from resourced.sinks.wav import WavFileSink

log = logging.getLogger(__name__)

#: How long `start()` waits for the server to say whether it has audio (seconds).
SUPPORT_TIMEOUT = 10.0
#: QEMU's format for VNC audio when the config names none: what desktops' sound
#: servers run at (PipeWire's default rate), so nothing is resampled twice.
DEFAULT_FORMAT = AudioFormat(rate=48000)


@dataclass(frozen=True, slots=True)
class AudioSettings:
    """How guests' sound is played (the config file's `[audio]` table)."""

    #: Play a guest's sound whenever its connection is open (else only after Start).
    autostart: bool = True
    #: The format QEMU is asked to send (it converts the guest's sound to it).
    format: AudioFormat = field(default_factory=lambda: DEFAULT_FORMAT)


class Playback(Protocol):
    """One guest's stream on the sound server (`resourced.sinks.pulse.PulsePlayback`)."""

    @property
    def playing(self) -> bool: ...
    @property
    def volume(self) -> float: ...
    @property
    def muted(self) -> bool: ...
    @property
    def underruns(self) -> int: ...
    @property
    def latency_usec(self) -> int: ...

    def begin(self, fmt: AudioFormat) -> None: ...
    def write(self, pcm: bytes) -> None: ...
    def end(self) -> None: ...
    def close(self) -> None: ...
    def set_volume(self, volume: float) -> None: ...
    def set_muted(self, muted: bool) -> None: ...


#: Makes a guest's playback stream: (guest name, called on every change) -> the
#: stream, or None when there is no sound server to play into (none could be loaded).
PlaybackFactory = Callable[[str, Callable[[], None]], Playback | None]


class GuestAudio:
    """One guest's sound: capture on its connection, playback, recording."""

    def __init__(
        self,
        name: str,
        link: GuestLink,
        settings: AudioSettings,
        playback_factory: PlaybackFactory | None,
        on_change: Callable[[], None],
    ) -> None:
        self.name = name
        self.link = link
        self.settings = settings
        self._on_change = on_change
        #: Whether the guest's VNC server offers QEMU audio (None: not known yet).
        self.offered: bool | None = None
        #: Sound plays when the connection is open (autostart, or after start()).
        self.on = settings.autostart
        self._held_for_playing = False
        self._held_for_recording = False
        self._ext: QemuAudio | None = None
        #: Set once this connection's server has said whether it has audio.
        self._answered = asyncio.Event()
        #: The format the data now arriving is in (None: no capture running).
        self.current_format: AudioFormat | None = None
        self._playback_factory = playback_factory
        #: Made on first use: the sound server is loaded after the service has
        #: its bus name (loading libpulse takes longer than activation should).
        self._playback: Playback | None = None
        self._last_latency = 0
        self.recorder: WavFileSink | None = None
        self._recording_format: AudioFormat | None = None
        for event_type, handler in (
            (AudioSupported, self._on_supported),
            (AudioBegin, self._on_begin),
            (AudioData, self._on_data),
            (AudioEnd, self._on_end),
        ):
            link.route(event_type, handler)

    # --- what the guest asks -------------------------------------------------------

    def extension(self) -> QemuAudio:
        """QEMU's audio extension for a new connection (fresh for each)."""
        self._ext = QemuAudio(self.settings.format, auto_enable=self._capturing)
        return self._ext

    @property
    def _capturing(self) -> bool:
        return self.on or self.recorder is not None

    def link_down(self) -> None:
        """The connection closed: the stream ends (it resumes on the next one)."""
        self._ext = None
        self._answered.clear()
        self._finish_capture()

    def server_answered(self) -> None:
        """The server answered our first update request: an audio acknowledgement
        comes before that (QEMU sends it as it handles SetEncodings), so none yet
        means the server has no audio."""
        if self._answered.is_set():
            return
        self._answered.set()
        if self.offered is not False:
            self.offered = False
            self._changed()

    @property
    def playback(self) -> Playback | None:
        """The guest's stream on the sound server (None: there is no sound server)."""
        if self._playback is None and self._playback_factory is not None:
            self._playback = self._playback_factory(self.name, self._changed)
        return self._playback

    # --- properties -----------------------------------------------------------------

    @property
    def available(self) -> bool:
        return bool(self.offered)

    # The properties read the stream only once it exists (reading makes none).

    @property
    def playing(self) -> bool:
        return self._playback is not None and self._playback.playing

    @property
    def volume(self) -> float:
        return 1.0 if self._playback is None else self._playback.volume

    @property
    def muted(self) -> bool:
        return False if self._playback is None else self._playback.muted

    @property
    def latency_usec(self) -> int:
        playback = self._playback
        if playback is None or not playback.playing:
            self._last_latency = 0
            return 0
        # The stream's timing is unknown for a moment after each rate change
        # (it reads 0 then): the last reading stands for it meanwhile.
        latency = playback.latency_usec or self._last_latency
        self._last_latency = latency
        return latency

    @property
    def underruns(self) -> int:
        return 0 if self._playback is None else self._playback.underruns

    @property
    def format(self) -> AudioFormat:
        return self.current_format or self.settings.format

    @property
    def recording(self) -> str:
        return "" if self.recorder is None else str(self.recorder.path)

    # --- methods ---------------------------------------------------------------------

    async def start(self) -> None:
        """Play the guest's sound from now on (connecting if need be).

        Raises `NotConnected` when the connection cannot be made and
        `Unsupported` when the guest's VNC server has no audio.
        """
        if self.playback is None:
            raise Unsupported("no sound server to play into (see the service's log)")
        self.on = True
        if not self._held_for_playing:
            self._held_for_playing = True
            self.link.hold()
        self._changed()
        await self._ensure_capture()

    def stop(self) -> None:
        """Stop playing the guest's sound (until `start()`); recording goes on."""
        self.on = False
        if self._playback is not None:
            self._playback.end()
        if self._held_for_playing:
            self._held_for_playing = False
            self.link.release()
        if self._ext is not None and self._ext.enabled and not self._capturing:
            self._ext.disable()
            self._flush()
        self._changed()

    async def record(self, path: Path) -> None:
        """Record the guest's sound into a WAV file at `path` (connecting if need be).

        Raises `ConfigurationError` if a recording is already running or the file
        cannot be made, `NotConnected`/`Unsupported` as `start()`.
        """
        if self.recorder is not None:
            raise ConfigurationError(f"already recording to {self.recorder.path}")
        fmt = self.format
        try:
            # A new file only: never overwrite (nor, on failure, remove) one someone has.
            self.recorder = WavFileSink(path, fmt, exclusive=True)
        except FileExistsError:
            raise ConfigurationError(f"{path} exists: give a new file name") from None
        except OSError as err:
            raise ConfigurationError(f"cannot write {path}: {err.strerror or err}") from None
        self._recording_format = fmt
        if not self._held_for_recording:
            self._held_for_recording = True
            self.link.hold()
        self._changed()
        try:
            await self._ensure_capture()
        except Exception:
            self.stop_recording()
            with contextlib.suppress(OSError):
                os.unlink(path)  # a header and nothing else: no recording at all
            raise

    def stop_recording(self) -> str:
        """End the recording; the path it was written to ("" if none ran)."""
        recorder, self.recorder = self.recorder, None
        if self._held_for_recording:
            self._held_for_recording = False
            self.link.release()
        if recorder is None:
            return ""
        with contextlib.suppress(OSError):
            recorder.close()
        log.info(
            "guest %s: recorded %d bytes to %s", self.name, recorder.bytes_written, recorder.path
        )
        if self._ext is not None and self._ext.enabled and not self._capturing:
            self._ext.disable()
            self._flush()
        self._changed()
        return str(recorder.path)

    def set_volume(self, volume: float) -> None:
        """Volume as linear amplitude, 0.0-1.0 (`ConfigurationError` outside that)."""
        if not 0.0 <= volume <= 1.0:
            raise ConfigurationError(f"volume must be 0.0 to 1.0 (linear amplitude), not {volume}")
        if self.playback is None:
            raise Unsupported("no sound server to play into (see the service's log)")
        self.playback.set_volume(volume)

    def set_muted(self, muted: bool) -> None:
        if self.playback is None:
            raise Unsupported("no sound server to play into (see the service's log)")
        self.playback.set_muted(muted)

    async def close(self) -> None:
        self.stop_recording()
        if self._held_for_playing:
            self._held_for_playing = False
            self.link.release()
        if self._playback is not None:
            self._playback.close()
            self._playback = None
        self._playback_factory = None

    # --- capture ------------------------------------------------------------------------

    async def _ensure_capture(self) -> None:
        """Connected, the server offers audio, and capture is enabled."""
        client = await self.link.wait_connected()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUPPORT_TIMEOUT):
                await self._answered.wait()
        if self._ext is None or not self._ext.supported:
            raise Unsupported(f"guest {self.name}: its VNC server offers no audio")
        if not self._ext.enabled:
            self._ext.enable()
            client.flush()

    def _on_supported(self, _event: AudioSupported) -> None:
        self._answered.set()
        if self.offered is not True:
            self.offered = True
            self._changed()

    def _on_begin(self, event: AudioBegin) -> None:
        self.current_format = event.format
        playback = self.playback if self.on else None
        if playback is not None:
            playback.begin(event.format)
        self._changed()

    def _on_data(self, event: AudioData) -> None:
        playback = self.playback if self.on else None
        if self.current_format != event.format:
            # Data with no BEGIN before it (QEMU sends BEGIN when the guest starts
            # playing; a capture enabled mid-sound gets data first).
            self.current_format = event.format
            if playback is not None:
                playback.begin(event.format)
        if playback is not None:
            playback.write(event.data)
        if self.recorder is not None and event.format == self._recording_format:
            try:
                self.recorder.write(event.data)
            except OSError as err:
                log.warning(
                    "guest %s: recording to %s failed: %s", self.name, self.recorder.path, err
                )
                self.stop_recording()

    def _on_end(self, _event: AudioEnd) -> None:
        self._finish_capture()

    def _finish_capture(self) -> None:
        self.current_format = None
        if self._playback is not None:
            self._playback.end()
        self._changed()

    def _flush(self) -> None:
        client = self.link.client
        if client is not None:
            client.flush()

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("guest %s: audio observer failed", self.name)
