"""gtk-vnc's own audio path, driven as a gtk-vnc app drives it (for bench/audio_bench.py).

Run it with Debian's `/usr/bin/python3` (packages `python3-gi` and
`gir1.2-gtk-vnc-2.0`), not the project's venv:

    /usr/bin/python3 bench/gtkvnc_audio_player.py SOCKET [s32|s16|u8]

It connects a `GVnc.Connection` to the VNC server on the Unix socket SOCKET
through the socket's fd (`open_fd`), answers security type None, and once the
connection is initialised does what gvncviewer does for audio: set the audio
format (S32, 2 channels, 44100 Hz, gvncviewer's), attach a
`GVncPulse.AudioPulse`, enable audio. A bare `GVnc.Connection` sends no
SetEncodings of its own (`GtkVnc.Display` sends one with the audio
pseudo-encoding in it), so it sends the one a display would need for audio.
From then on gtk-vnc does everything itself: it batches what arrives for up to
50 ms and writes it with `pa_simple_write` to a 100 ms PulseAudio stream on the
default sink (`PULSE_SERVER`, `PULSE_SINK`).

It runs until the server closes the connection, then prints one JSON line on
stdout: gtk-vnc reports no underruns or latency, so those are null. It is not
part of resourced and imports nothing from it.
"""

import json
import socket
import sys

import gi

gi.require_version("GVnc", "1.0")
gi.require_version("GVncPulse", "1.0")
from gi.repository import GLib, GVnc, GVncPulse  # noqa: E402

FORMATS = {
    "s32": GVnc.AudioFormatType.S32,
    "s16": GVnc.AudioFormatType.S16,
    "u8": GVnc.AudioFormatType.U8,
}


def main() -> int:
    path = sys.argv[1]
    sample = FORMATS[sys.argv[2] if len(sys.argv) > 2 else "s32"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)

    loop = GLib.MainLoop()
    conn = GVnc.Connection.new()
    pulse = GVncPulse.AudioPulse.new()
    errors = []

    def choose_type(connection, types):
        # rfbproto's None (1), by number: PyGObject cannot load GVnc.ConnectionAuth,
        # one of whose values does not fit its type.
        connection.set_auth_type(1)

    def initialized(connection):
        fmt = GVnc.AudioFormat.new()
        fmt.format = sample
        fmt.nchannels = 2
        fmt.frequency = 44100
        connection.set_audio_format(fmt)
        connection.set_audio(pulse)
        connection.set_encodings([int(GVnc.ConnectionEncoding.AUDIO)])
        connection.audio_enable()

    conn.connect("vnc-auth-choose-type", choose_type)
    conn.connect("vnc-initialized", initialized)
    conn.connect("vnc-error", lambda connection, message: errors.append(message))
    conn.connect("vnc-disconnected", lambda connection: loop.quit())
    conn.open_fd(sock.fileno())
    loop.run()
    sock.close()
    print(json.dumps({"underruns": None, "latency_usec": None, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
