"""gtk-vnc's own display widget on a VNC socket: does it see power control (xvp)?

Run by the tests with Debian's system Python (GtkVnc, GVnc and Gtk come from
Debian's gir packages, not from our venv) under Xvfb:
`python3 gtkvnc_power.py SOCKET`. It opens gtk-vnc's `Display` (what gvncviewer
shows) on the Unix socket, waits for the connection's power-control-initialized
signal (what enables gvncviewer's Power menu), asks for a reboot, which QEMU
answers with xvp FAIL, and prints each step. Exit 0 once both came, 1 on
disconnection or after 60 s.
"""

import socket
import sys

import gi

gi.require_version("Gtk", "3.0")
gi.require_version("GtkVnc", "2.0")
gi.require_version("GVnc", "1.0")
from gi.repository import GLib, Gtk, GtkVnc, GVnc  # noqa: E402

TIMEOUT_MS = 60_000


def main() -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    result = {"code": 1}
    window = Gtk.Window()
    display = GtkVnc.Display()
    window.add(display)
    window.show_all()
    connection = display.get_connection()

    def initialized(*_args: object) -> None:
        print("power-control-initialized", flush=True)
        connection.power_control(GVnc.ConnectionPowerAction.REBOOT)

    def failed(*_args: object) -> None:
        print("power-control-failed", flush=True)  # QEMU cannot reboot: xvp FAIL came back
        result["code"] = 0
        Gtk.main_quit()

    def disconnected(*_args: object) -> None:
        print("disconnected", flush=True)
        Gtk.main_quit()

    def timed_out() -> bool:
        print("timed out", flush=True)
        Gtk.main_quit()
        return False

    connection.connect("vnc-power-control-initialized", initialized)
    connection.connect("vnc-power-control-failed", failed)
    display.connect("vnc-disconnected", disconnected)
    display.connect("vnc-initialized", lambda *_: print("initialized", flush=True))
    display.open_fd(sock.fileno())
    GLib.timeout_add(TIMEOUT_MS, timed_out)
    Gtk.main()
    return result["code"]


if __name__ == "__main__":
    sys.exit(main())
