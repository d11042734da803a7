"""Guest sound to PulseAudio (or PipeWire's PulseAudio server): one stream per guest.

`PulseServer` is one connection to the sound server, kept up by a background
task that reconnects (with a backoff up to ~2 s) whenever the server goes away
or is not there yet. `PulseServer.playback(name)` gives a `PulsePlayback`, an
`AudioSink` that plays one guest's PCM on its own playback stream (one entry per
guest in the desktop's mixer), survives server restarts by re-creating its
stream, and follows volume and mute changed in the mixer.

How the sound is played: each chunk is written to the stream as it arrives (the
write never blocks; the server's buffer *is* the jitter buffer, so PCM spends no
time in Python). Before each write the stream's level (audio written and not
yet played, from its timing info: see `PulsePlayback._level`) is read back;
`resourced.playout` turns arrival times and levels into a buffer target
(`tlength`/`prebuf`) and a sample rate for the `VARIABLE_RATE` stream, which
absorbs the guest's clock skew without dropping or inserting samples. Only a
guest faster than that steering can follow (or a server that stops playing the
stream) fills the buffer to its bound; then sound is dropped until the level is
back at the target. A guest that stops sending for longer than its buffer (a
pause: no END comes) is not playing any more; the underflow that the empty
buffer causes is not counted as an underrun, and the next chunk starts afresh
from the prebuffer.

This module speaks to libpulse through the `libpulse` package (ctypes over
libpulse.so.0, driven by asyncio). Only one `libpulse.LibPulse` may exist per
event loop, so only one `PulseServer` may be started per loop.

It is not a mixer, does not record, and holds no policy about which guest
plays: the broker decides that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final

from resourced.audio import AudioFormat, SampleFormat
from resourced.errors import AudioUnavailable
from resourced.playout import Playout, PlayoutConfig

__all__ = ["PulsePlayback", "PulseServer"]

log = logging.getLogger(__name__)

APPLICATION_ID: Final = "org.resourced.Resourced1"
_BACKOFF_MIN: Final = 0.1  # seconds before the first reconnection attempt
_BACKOFF_MAX: Final = 2.0  # ... doubling up to this
_SOCKET_POLL: Final = 0.25  # seconds between looks for a server socket not there yet
_MAX_BUFFER: Final = 2.0  # seconds: the stream's maxlength (beyond the largest target)
_ATTR_INTERVAL: Final = 1.0  # seconds between two buffer-attribute changes at most
_ATTR_CHANGE: Final = 0.005  # seconds: target moves smaller than this are not applied
_MINREQ: float | None = None  # None: the server's choice
# tlength's floor, seconds. pipewire-pulse (0.3.65) asks PipeWire's graph for a
# quarter of tlength (node.latency, with ADJUST_LATENCY and the default minreq),
# and the graph runs at the largest power-of-two quantum within the smallest
# node.latency of its streams. 44 ms keeps ours at 11 ms, a 512-frame quantum
# at 48 kHz: a calm 20 ms target alone would ask for 256 frames (5.3 ms), and a
# graph cycle that late drops out on a busy machine (bench/README.md, "PipeWire's
# short gaps"). It binds only while the target is under 22 ms.
_MIN_TLENGTH: Final = 0.044
_RECREATE_DELAY: Final = 0.5  # seconds before a failed stream is made again
_VOLUME_EPSILON: Final = 1e-3  # linear volume differences below this are rounding

# Bytes that flip the top bit: turns an unsigned sample's most significant byte
# into the signed one's (and back). PulseAudio has no S8, U16 or U32 formats.
_FLIP_SIGN: Final = bytes(b ^ 0x80 for b in range(256))


def _lib() -> Any:
    """The libpulse package's module, imported on first use.

    Importing it exits the process (sys.exit) when libpulse.so.0 is missing;
    that becomes AudioUnavailable here.
    """
    try:
        import libpulse.libpulse as lib
    except SystemExit as error:
        raise AudioUnavailable(
            f"the PulseAudio client library (libpulse.so.0) is not available: {error}"
        ) from None
    except ImportError as error:
        raise AudioUnavailable(f"the libpulse Python package is not installed: {error}") from error
    return lib


def _convert(fmt: AudioFormat) -> tuple[str, Callable[[bytes], bytes] | None]:
    """The PA sample format for `fmt`, and how to convert PCM to it (None: as is)."""
    match fmt.sample_format:
        # 8-bit PCM is widened to S16: PipeWire's pulse server (0.3.65) plays
        # PA_SAMPLE_U8 as if it were signed (a full-scale square, off pitch).
        case SampleFormat.U8:
            return "PA_SAMPLE_S16LE", lambda pcm: _widen_8bit(pcm.translate(_FLIP_SIGN))
        case SampleFormat.S8:
            return "PA_SAMPLE_S16LE", _widen_8bit
        case SampleFormat.S16:
            return "PA_SAMPLE_S16LE", None
        case SampleFormat.U16:
            return "PA_SAMPLE_S16LE", lambda pcm: _flip_top_byte(pcm, 2)
        case SampleFormat.S32:
            return "PA_SAMPLE_S32LE", None
        case SampleFormat.U32:
            return "PA_SAMPLE_S32LE", lambda pcm: _flip_top_byte(pcm, 4)


def _cancel_requested() -> bool:
    """Whether the running task has been asked to cancel (and has not taken it back)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _stream_frame_size(fmt: AudioFormat) -> int:
    """Bytes per frame on the stream (after `_convert`: 8-bit samples are widened)."""
    return max(2, fmt.sample_format.size) * fmt.channels


def _widen_8bit(pcm: bytes) -> bytes:
    """Signed 8-bit samples to S16LE: each becomes the high byte, the low byte 0."""
    wide = bytearray(2 * len(pcm))
    wide[1::2] = pcm
    return bytes(wide)


def _flip_top_byte(pcm: bytes, size: int) -> bytes:
    data = bytearray(pcm)
    data[size - 1 :: size] = data[size - 1 :: size].translate(_FLIP_SIGN)
    return bytes(data)


class PulseServer:
    """One connection to a PulseAudio-protocol sound server, kept up in the background.

    `server` is a PULSE_SERVER string (`unix:/path`, ...) or None for libpulse's
    default ($PULSE_SERVER, else the user's runtime directory).
    """

    def __init__(self, server: str | None = None, *, client_name: str = "resourced") -> None:
        self.server = server
        self.client_name = client_name
        self._task: asyncio.Task[None] | None = None
        self._lib: Any = None
        self._pulse: Any = None  # the connected libpulse.LibPulse, or None
        self._playbacks: list[PulsePlayback] = []
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connects = 0  # successful connections so far (tests, diagnostics)
        self._was_ready = False

    @property
    def connected(self) -> bool:
        return self._pulse is not None

    async def start(self) -> None:
        """Start connecting in the background; returns at once.

        Raises AudioUnavailable only if libpulse itself is missing, never
        because no sound server is there (yet).
        """
        if self._task is not None:
            return
        self._lib = _lib()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"pulse {self.server or 'default'}")

    async def close(self) -> None:
        """Disconnect for good; every playback stops (and is forgotten)."""
        self._closing = True
        for playback in list(self._playbacks):
            playback.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for t in list(self._tasks):
            t.cancel()

    def playback(
        self,
        name: str,
        *,
        properties: Mapping[str, str] | None = None,
        on_change: Callable[[], None] | None = None,
        config: PlayoutConfig | None = None,
    ) -> PulsePlayback:
        """A new playback stream named `name` (media.name) for one guest.

        `config` tunes the jitter buffer and drift control (default: PlayoutConfig()).
        """
        playback = PulsePlayback(
            self, name, properties=properties, on_change=on_change, config=config
        )
        self._playbacks.append(playback)
        return playback

    # -- the connection task ---------------------------------------------------------

    def _socket_path(self) -> str | None:
        """The Unix socket the server listens on, where that can be told (the
        server string, $PULSE_SERVER, else libpulse's per-user default)."""
        server = self.server or os.environ.get("PULSE_SERVER")
        if server is not None:
            return server[5:] if server.startswith("unix:") else None
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        return os.path.join(runtime, "pulse", "native") if runtime else None

    def _socket_missing(self) -> bool:
        path = self._socket_path()
        return path is not None and not os.path.exists(path)

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._closing:
            if self._socket_missing():
                # No server there: don't build a libpulse context to find out.
                # Each failed one holds the loop for tens of ms (the libpulse
                # package collects garbage when its main loop closes); a stat
                # costs nothing, so look again soon.
                await asyncio.sleep(_SOCKET_POLL)
                continue
            # libpulse cancels the task that entered `async with LibPulse()` when
            # the context fails: that is this child task, never _run itself.
            session = asyncio.create_task(self._session())
            try:
                await session
            except asyncio.CancelledError:
                if self._closing or not session.cancelled() or _cancel_requested():
                    raise
            except Exception as error:
                log.debug("sound server %s: %s", self.server or "(default)", error)
            if self._closing:
                return
            if _cancel_requested():
                # _run itself was cancelled (asyncio.run does so at its end,
                # without close()) while the session ran: that cancels the
                # session too, whose event iterator (the libpulse package's)
                # then ends quietly, so the session returned as if the server
                # had gone. The cancellation is ours: end.
                raise asyncio.CancelledError
            if self.connects and backoff == _BACKOFF_MIN:
                log.info("sound server %s went away; reconnecting", self.server or "(default)")
            await asyncio.sleep(backoff)
            backoff = _BACKOFF_MIN if self._was_ready else min(2 * backoff, _BACKOFF_MAX)

    async def _session(self) -> None:
        lib = self._lib
        self._was_ready = False
        pulse = lib.LibPulse(self.client_name, server=self.server)
        async with pulse:
            try:
                self._pulse = pulse
                self._was_ready = True
                self.connects += 1
                events = pulse.get_events_iterator()
                await pulse.pa_context_subscribe(lib.PA_SUBSCRIPTION_MASK_SINK_INPUT)
                for playback in self._playbacks:
                    playback._attach()
                async for event in events:
                    if event.facility != "sink_input" or event.type != "change":
                        continue
                    for playback in self._playbacks:
                        if playback._index == event.index:
                            self.spawn(playback._refresh())
            finally:
                self._pulse = None
                for playback in self._playbacks:
                    playback._detach()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a libpulse operation in the background, logging its failure."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("sound server operation failed: %s", task.exception())

    def _forget(self, playback: PulsePlayback) -> None:
        with contextlib.suppress(ValueError):
            self._playbacks.remove(playback)


class PulsePlayback:
    """One guest's playback stream: an `AudioSink` of kind "pulseaudio".

    `volume` is a linear amplitude factor (0.0-1.0, all channels), `muted` the
    stream's mute; both are kept across stream re-creation and server restarts
    and follow changes made in the desktop mixer. `on_change()` is called on
    the loop whenever `playing`, `volume`, `muted` or `underruns` changes.
    """

    kind = "pulseaudio"

    def __init__(
        self,
        server: PulseServer,
        name: str,
        *,
        properties: Mapping[str, str] | None = None,
        on_change: Callable[[], None] | None = None,
        config: PlayoutConfig | None = None,
    ) -> None:
        self._server = server
        self.name = name
        self._properties = {
            "media.name": name,
            "application.name": "resourced",
            "application.id": APPLICATION_ID,
            "application.icon_name": "computer",
            "media.role": "video",
            **(properties or {}),
        }
        self._on_change = on_change
        self._config = config or PlayoutConfig()
        self._loop = asyncio.get_running_loop()
        self._format: AudioFormat | None = None
        self._converter: Callable[[bytes], bytes] | None = None
        self._playout: Playout | None = None
        self._stream: Any = None  # pa_stream * while we have one
        self._ready = False
        self._index: int | None = None  # the sink input's index while ready
        self._callbacks: list[Any] = []  # ctypes callbacks C holds: keep them alive
        self._volume = 1.0
        self._muted = False
        self._playing = False
        self._underruns = 0
        self._pending_underflow = False
        self._started = False  # the server plays the stream (prebuffer done, no underflow since)
        self._corked = False  # held (corked) until a prebuffer is written again
        self._refill = 0  # bytes written since
        self._ending = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._attrs: tuple[int, int] | None = None  # (tlength, prebuf) bytes applied
        self._attrs_time = -math.inf
        self._rate: int | None = None  # sample rate applied to the stream
        self._restart = False  # end() came: the next begin() starts a new capture
        self._dropping = False  # over the bound: chunks dropped until back at the target
        self._logged = -math.inf  # when the play-out state was last logged (debug)
        self.resyncs = 0  # times the buffer was brought back within its bound (diagnostics)
        self.rate_changes = 0  # applied so far (tests, diagnostics)
        self._sink_usec: int | None = None  # the sink's part of the level, last read

    # -- what the broker reads -------------------------------------------------------

    @property
    def playing(self) -> bool:
        return self._playing

    @property
    def volume(self) -> float:
        return self._volume

    @property
    def muted(self) -> bool:
        return self._muted

    @property
    def underruns(self) -> int:
        return self._underruns

    @property
    def format(self) -> AudioFormat | None:
        return self._format

    @property
    def sample_rate(self) -> int | None:
        """The rate the stream plays at now (nominal, corrected for drift)."""
        return self._rate

    @property
    def target_usec(self) -> int:
        """The play-out buffer target now, microseconds (0 before any format)."""
        return 0 if self._playout is None else round(self._playout.target * 1e6)

    @property
    def latency_usec(self) -> int:
        """The stream's latency now (buffered + the sink's), 0 when not playing."""
        if not self._playing or not self._ready:
            return 0
        level = self._level()
        return 0 if level is None else round(level * 1e6)

    # -- AudioSink ---------------------------------------------------------------------

    def begin(self, fmt: AudioFormat) -> None:
        """Capture started in `fmt`: (re)create the stream for it if need be."""
        if self._closed:
            return
        self._ending = False
        restart, self._restart = self._restart, False
        if fmt == self._format and self._playout is not None:
            if restart:
                # A new capture (after an END or a reconnection): its arrivals and
                # the gap before them say nothing of the guest's clock, so the
                # play-out starts afresh, at the nominal rate, on the same stream.
                self._playout = Playout(fmt.rate, self._config)
                if self._stream is not None and self._rate not in (None, fmt.rate):
                    self._set_rate(fmt.rate)
            return
        self._format = fmt
        _pa_format, self._converter = _convert(fmt)
        self._playout = Playout(fmt.rate, self._config)
        self._detach()
        self._set_playing(False)
        self._attach()

    def write(self, pcm: bytes) -> None:
        """Queue one chunk of PCM in the begun format; never blocks.

        Chunks that come while there is no stream (no server, or before
        `begin`) are dropped: the guest's time does not wait.
        """
        fmt, playout = self._format, self._playout
        if self._closed or fmt is None or playout is None:
            return
        usable = len(pcm) - len(pcm) % fmt.frame_size
        if usable <= 0:
            return
        if usable != len(pcm):
            pcm = pcm[:usable]
        now = self._loop.time()
        if self._pending_underflow:
            # The buffer ran dry and data kept coming: a real underrun.
            self._pending_underflow = False
            self._underruns += 1
            playout.underrun(now)
            log.debug("%s: underrun %d", self.name, self._underruns)
            self._notify()
        self._ending = False
        if not self._ready:
            playout.arrival(now, usable // fmt.frame_size, None)
            return
        lib = self._server._lib
        queued = self._queued()
        level = queued[0] if queued is not None and queued[1] else None
        playout.arrival(now, usable // fmt.frame_size, level)
        # The bound holds whether the server plays the stream or not (someone
        # else may cork it: a mixer, a policy).
        if self._over_bound(None if queued is None else queued[0], playout):
            return
        if log.isEnabledFor(logging.DEBUG) and now - self._logged >= 1.0:
            self._logged = now
            log.debug(
                "%s: level %s ms (sink %s ms), target %.0f ms, setpoint %s ms, spread %.0f ms, "
                "rate %s, skew %+.2f %%, correction %+.2f %%",
                self.name,
                "-" if level is None else f"{level * 1e3:.0f}",
                "-" if self._sink_usec is None else f"{self._sink_usec / 1e3:.0f}",
                playout.target * 1e3,
                "-" if playout.setpoint is None else f"{playout.setpoint * 1e3:.0f}",
                playout.jitter.spread * 1e3,
                self._rate,
                playout.jitter.skew * 100,
                playout.drift.correction * 100,
            )
        data = self._converter(pcm) if self._converter is not None else pcm
        if lib.pa_stream_write(self._stream, data, len(data), None, 0, lib.PA_SEEK_RELATIVE) < 0:
            log.debug("%s: pa_stream_write failed", self.name)
            return
        if self._corked:
            self._refilled(len(data))
        self._set_playing(True)
        self._apply_rate(now)
        self._apply_attrs(now)
        self._arm_timer()

    def end(self) -> None:
        """Capture ended: play out what is buffered, then stop."""
        if self._closed or not self._ready:
            self._restart = True
            self._set_playing(False)
            return
        self._ending = True
        self._restart = True
        self._pending_underflow = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._corked and self._server._pulse is not None:
            # Less than a prebuffer came: play it anyway (a drain waits for it).
            self._corked = False
            self._server.spawn(self._server._pulse.pa_stream_cork(self._stream, 0))
        if self._playing:
            self._server.spawn(self._drain())

    def close(self) -> None:
        """Stop playing and remove the stream for good."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        self._server._forget(self)
        self._set_playing(False)

    def set_volume(self, volume: float) -> None:
        """Set the linear volume (0.0-1.0), now or when the stream exists."""
        if not 0.0 <= volume <= 1.0 or math.isnan(volume):
            raise ValueError(f"volume must be within 0.0-1.0, not {volume}")
        changed = abs(volume - self._volume) > _VOLUME_EPSILON
        self._volume = volume
        if self._index is not None and self._server._pulse is not None:
            pulse = self._server._pulse
            self._server.spawn(
                pulse.pa_context_set_sink_input_volume(self._index, self._cvolume().byref())
            )
        if changed:
            self._notify()

    def set_muted(self, muted: bool) -> None:
        """Mute or unmute, now or when the stream exists."""
        changed = muted != self._muted
        self._muted = muted
        if self._index is not None and self._server._pulse is not None:
            pulse = self._server._pulse
            self._server.spawn(pulse.pa_context_set_sink_input_mute(self._index, int(muted)))
        if changed:
            self._notify()

    # -- the stream --------------------------------------------------------------------

    def _attach(self) -> None:
        """Create and connect the stream, if connected and the format is known."""
        pulse, lib, fmt = self._server._pulse, self._server._lib, self._format
        if self._closed or pulse is None or fmt is None or self._stream is not None:
            return
        pa_format, _ = _convert(fmt)
        spec = lib.Pa_sample_spec(getattr(lib, pa_format), fmt.rate, fmt.channels)
        proplist = lib.pa_proplist_new()
        try:
            for key, value in self._properties.items():
                lib.pa_proplist_sets(proplist, key.encode(), value.encode())
            stream = lib.pa_stream_new_with_proplist(
                pulse.c_context, self.name.encode(), spec.byref(), None, proplist
            )
        finally:
            lib.pa_proplist_free(proplist)
        if not stream:
            log.warning("%s: cannot create a playback stream", self.name)
            return
        self._stream = stream
        self._ready = False
        self._corked = True
        self._refill = 0
        self._attrs = self._buffer_attrs()
        self._rate = fmt.rate
        state_cb = lib.callback_func_ptr("pa_stream_notify_cb_t", self._on_state)
        underflow_cb = lib.callback_func_ptr("pa_stream_notify_cb_t", self._on_underflow)
        started_cb = lib.callback_func_ptr("pa_stream_notify_cb_t", self._on_started)
        self._callbacks = [state_cb, underflow_cb, started_cb]
        lib.pa_stream_set_state_callback(stream, state_cb, None)
        lib.pa_stream_set_underflow_callback(stream, underflow_cb, None)
        lib.pa_stream_set_started_callback(stream, started_cb, None)
        tlength, prebuf = self._attrs
        maxlength = round(_MAX_BUFFER * fmt.byte_rate) // fmt.frame_size * fmt.frame_size
        attr = lib.Pa_buffer_attr(maxlength, tlength, prebuf, self._minreq(), 0xFFFFFFFF)
        flags = (
            lib.PA_STREAM_ADJUST_LATENCY
            | lib.PA_STREAM_VARIABLE_RATE
            | lib.PA_STREAM_AUTO_TIMING_UPDATE
            | lib.PA_STREAM_INTERPOLATE_TIMING
            # Held until a prebuffer is in: PipeWire ignores prebuf and would
            # start on the first chunk (see _hold_for_prebuffer).
            | lib.PA_STREAM_START_CORKED
            | (lib.PA_STREAM_START_MUTED if self._muted else lib.PA_STREAM_START_UNMUTED)
        )
        if (
            lib.pa_stream_connect_playback(
                stream, None, attr.byref(), flags, self._cvolume().byref(), None
            )
            < 0
        ):
            log.warning("%s: cannot connect the playback stream", self.name)
            self._detach()

    def _detach(self) -> None:
        """Drop the stream (server gone, new format, close)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        stream, self._stream = self._stream, None
        self._ready = False
        self._index = None
        self._pending_underflow = False
        self._started = False
        self._corked = False
        self._dropping = False
        if stream is not None:
            lib = self._server._lib
            lib.pa_stream_set_state_callback(stream, None, None)
            lib.pa_stream_set_underflow_callback(stream, None, None)
            lib.pa_stream_set_started_callback(stream, None, None)
            if lib.pa_stream_get_state(stream) == lib.PA_STREAM_READY:
                lib.pa_stream_disconnect(stream)
            lib.pa_stream_unref(stream)
        self._callbacks = []
        if self._playing and not self._closed:
            self._set_playing(False)

    def _cvolume(self) -> Any:
        lib, fmt = self._server._lib, self._format
        channels = fmt.channels if fmt is not None else 2
        volume = lib.pa_sw_volume_from_linear(self._volume)
        return lib.Pa_cvolume(channels, [volume] * channels)

    def _minreq(self) -> int:
        fmt = self._format
        if _MINREQ is None or fmt is None:
            return 0xFFFFFFFF
        return max(1, round(_MINREQ * fmt.rate)) * fmt.frame_size

    def _buffer_attrs(self) -> tuple[int, int]:
        fmt, playout = self._format, self._playout
        assert fmt is not None
        assert playout is not None

        def frames(seconds: float) -> int:
            return max(1, round(seconds * fmt.rate)) * fmt.frame_size

        return frames(max(2 * playout.target, _MIN_TLENGTH)), frames(playout.prebuffer)

    def _on_state(self, stream: Any, _userdata: Any) -> None:
        try:
            lib = self._server._lib
            if stream != self._stream or self._stream is None:
                return
            state = lib.pa_stream_get_state(self._stream)
            if state == lib.PA_STREAM_READY:
                self._ready = True
                self._index = lib.pa_stream_get_index(self._stream)
                log.debug("%s: stream ready, sink input %s", self.name, self._index)
                # What was set while there was no stream wins over what the
                # server gave the new one (its default, or a restored volume).
                self._server.spawn(self._push_volume())
            elif state in (lib.PA_STREAM_FAILED, lib.PA_STREAM_TERMINATED):
                # The sink went away or the stream was killed: make a new one,
                # a little later (a server without a sink refuses at once).
                self._detach()
                self._loop.call_later(_RECREATE_DELAY, self._attach)
        except Exception:
            log.exception("%s: stream state callback", self.name)

    def _on_started(self, _stream: Any, _userdata: Any) -> None:
        self._started = True

    def _on_underflow(self, _stream: Any, _userdata: Any) -> None:
        try:
            if self._playout is not None:
                self._playout.stopped()
            started, self._started = self._started, False
            log.debug("%s: underflow (playing %s, started %s)", self.name, self._playing, started)
            # PipeWire reports an underflow again when a stream that ran dry gets
            # data: only one that was playing is an underrun.
            if started:
                self._hold_for_prebuffer()
            if self._playing and started and not self._ending:
                # Counted only when more data comes before the pause deadline:
                # a paused guest's buffer runs dry too, and that is no underrun.
                self._pending_underflow = True
        except Exception:
            log.exception("%s: underflow callback", self.name)

    def _level(self) -> float | None:
        """Seconds of audio written and not yet played (the whole latency), or None.

        The whole latency, sink's part included, is what the prebuffer fills
        before play starts, and what must not reach zero. It is worked out
        here from the stream's timing info: the server's read index, the
        sink's latency and when the server measured them (libpulse refreshes
        them by itself), the write index libpulse moves on every write, and
        the time since at the rate the stream plays now.

        Not `pa_stream_get_latency`: libpulse reckons a stream's time from its
        byte indices at the current rate and keeps that time monotonic, so a
        rate raised by r on a stream that has played for T seconds freezes it
        for r x T (3 s for +3 % after 100 s; 0.1 % on an hour-old stream:
        3.6 s), and the latency it reports meanwhile starts near 0 and climbs
        with each write. Read as the level, that made the drift controller
        slow the stream down and the buffer grow, ever worse as the stream
        aged, until it held seconds (see `_over_bound`).
        """
        queued = self._queued()
        return queued[0] if queued is not None and queued[1] else None

    def _queued(self) -> tuple[float, bool] | None:
        """(seconds written and not yet played, whether the server plays them), or None.

        See `_level`; while the server does not play the stream, what it holds
        is not running down.
        """
        lib, fmt, rate = self._server._lib, self._format, self._rate
        if fmt is None or not rate:
            return None
        pointer = lib.pa_stream_get_timing_info(self._stream)
        if not pointer:
            return None
        info = pointer.contents
        if info.write_index_corrupt or info.read_index_corrupt:
            return None
        buffered = float(info.write_index - info.read_index) / (_stream_frame_size(fmt) * rate)
        sink = float(info.sink_usec) / 1e6
        self._sink_usec = int(info.sink_usec)
        if not info.playing:
            return max(0.0, buffered + sink), False
        measured = float(info.timestamp.tv_sec) + float(info.timestamp.tv_usec) / 1e6
        since = max(0.0, time.time() - measured)  # libpulse stamps it with gettimeofday
        return max(0.0, buffered + sink - since), True

    def _over_bound(self, level: float | None, playout: Playout) -> bool:
        """Whether to drop this chunk: the buffer is over its bound, or coming back.

        The rate steering follows a guest up to `max_correction` off; one that
        sends faster still (or a server that stops playing the stream) would
        fill the buffer without end, and past the stream's maxlength the
        server discards what is written (PulseAudio leaves holes that play as
        silence). Past `Playout.limit`, chunks are dropped (a logged re-sync)
        until the level is back at the target.
        """
        if level is None or self._corked:
            # Held for a prebuffer (which must fill), or no timing yet.
            self._dropping = False
            return False
        if self._dropping:
            if level > playout.target:
                return True
            self._dropping = False
            playout.stopped()  # the level aimed at starts again from here
            return False
        if level <= playout.limit:
            return False
        self._dropping = True
        self.resyncs += 1
        log.info(
            "%s: %.0f ms buffered, over the %.0f ms bound (the guest sends faster than "
            "the stream plays): dropping sound until it is back at %.0f ms",
            self.name,
            level * 1e3,
            playout.limit * 1e3,
            playout.target * 1e3,
        )
        return True

    def _apply_rate(self, now: float) -> None:
        playout = self._playout
        if playout is None:
            return
        rate = playout.rate_changed(now)
        if rate is not None and rate != self._rate:
            self._set_rate(rate)

    def _set_rate(self, rate: int) -> None:
        """Play the stream at `rate` from now on (the level is read at it at once)."""
        pulse, stream = self._server._pulse, self._stream
        if pulse is None or stream is None:
            return
        self._rate = rate
        self.rate_changes += 1
        self._server.spawn(pulse.pa_stream_update_sample_rate(stream, rate))

    def _apply_attrs(self, now: float) -> None:
        pulse, fmt = self._server._pulse, self._format
        if pulse is None or fmt is None or self._attrs is None:
            return
        if now - self._attrs_time < _ATTR_INTERVAL:
            return
        tlength, prebuf = self._buffer_attrs()
        if abs(tlength - self._attrs[0]) < _ATTR_CHANGE * fmt.byte_rate:
            return
        lib = self._server._lib
        self._attrs = (tlength, prebuf)
        self._attrs_time = now
        maxlength = round(_MAX_BUFFER * fmt.byte_rate) // fmt.frame_size * fmt.frame_size
        attr = lib.Pa_buffer_attr(maxlength, tlength, prebuf, self._minreq(), 0xFFFFFFFF)
        self._server.spawn(pulse.pa_stream_set_buffer_attr(self._stream, attr.byref()))

    async def _drain(self) -> None:
        pulse, stream = self._server._pulse, self._stream
        if pulse is not None and stream is not None:
            await pulse.pa_stream_drain(stream)
        if self._ending:
            self._ending = False
            self._set_playing(False)

    async def _push_volume(self) -> None:
        pulse, index = self._server._pulse, self._index
        if pulse is None or index is None:
            return
        await pulse.pa_context_set_sink_input_volume(index, self._cvolume().byref())
        await pulse.pa_context_set_sink_input_mute(index, int(self._muted))
        await self._refresh()

    async def _refresh(self) -> None:
        """Read volume and mute back from the server (set here or in a mixer)."""
        pulse, index = self._server._pulse, self._index
        if pulse is None or index is None:
            return
        lib = self._server._lib
        info = await pulse.pa_context_get_sink_input_info(index)
        if index != self._index:
            return
        values = info.volume.values[: info.volume.channels] or [lib.PA_VOLUME_NORM]
        volume = min(1.0, lib.pa_sw_volume_to_linear(max(values)))
        muted = bool(info.mute)
        changed = abs(volume - self._volume) > _VOLUME_EPSILON or muted != self._muted
        self._volume = volume if abs(volume - self._volume) > _VOLUME_EPSILON else self._volume
        self._muted = muted
        if changed:
            self._notify()

    # -- pauses ------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None or self._playout is None:
            return
        deadline = self._playout.deadline()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._check_pause)

    def _check_pause(self) -> None:
        self._timer = None
        playout = self._playout
        if playout is None:
            return
        now = self._loop.time()
        if playout.expire(now):
            self._pending_underflow = False
            self._hold_for_prebuffer()
            self._set_playing(False)
        else:
            self._arm_timer()

    def _hold_for_prebuffer(self) -> None:
        """Stop the stream until a whole prebuffer has been written again.

        PulseAudio waits for `prebuf` by itself at the start and after an
        underflow; PipeWire's pulse server (0.3.65) starts on the first chunk,
        which then runs dry at once. Corking the stream and uncorking it once the prebuffer is
        in makes both start afresh the same way.
        """
        pulse, stream = self._server._pulse, self._stream
        if pulse is None or stream is None or not self._ready or self._corked:
            return
        self._corked = True
        self._refill = 0
        log.debug("%s: corked until a prebuffer is in", self.name)
        self._server.spawn(pulse.pa_stream_cork(stream, 1))

    def _refilled(self, written: int) -> None:
        pulse, stream, fmt, playout = (
            self._server._pulse,
            self._stream,
            self._format,
            self._playout,
        )
        if pulse is None or stream is None or fmt is None or playout is None:
            return
        self._refill += written
        if self._refill >= playout.prebuffer * fmt.rate * _stream_frame_size(fmt):
            log.debug("%s: uncorked, %d bytes in", self.name, self._refill)
            self._corked = False
            self._server.spawn(pulse.pa_stream_cork(stream, 0))

    def _set_playing(self, playing: bool) -> None:
        if playing != self._playing:
            log.debug("%s: playing %s", self.name, playing)
            self._playing = playing
            self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("%s: on_change", self.name)
