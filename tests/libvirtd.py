"""A real libvirtd for the integration tests: use the running one, or start one as root.

`ensure_libvirtd()` first asks `virsh -c qemu:///system version`. If that fails it
makes libvirt run QEMU as root (appending `user = "root"` / `group = "root"` to
/etc/libvirt/qemu.conf unless a user/group is already set there), starts
`virtlogd` and `libvirtd` as daemons (each only if its socket does not answer),
and polls `virsh version` until it answers. The daemons are left running for
later tests and runs; they are system services, not per-test processes.

Why QEMU as root: with Debian's default (QEMU as `libvirt-qemu`, which cannot
open the root-only /dev/kvm) libvirt keeps re-probing QEMU's capabilities and
starting a tiny TCG domain takes about a minute instead of well under a second.

The first `virsh version` after libvirtd starts takes ~12 s (libvirt probes QEMU);
the timeouts here are far more generous. Every failure raises LibvirtdUnavailable
with what was tried and the daemons' own words: tests turn it into a failure,
never a skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from resourced.demo.bootsector import build_boot_sector

SYSTEM_URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRTD_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd.log")

#: How long libvirtd gets to answer once started (the first answer takes ~12 s).
START_TIMEOUT = 180.0
#: One `virsh version` call (it can take the whole QEMU probe time).
VIRSH_TIMEOUT = 120.0
POLL_INTERVAL = 0.5

_ACTIVE_SETTING = r"^\s*{}\s*="


class LibvirtdUnavailable(Exception):
    """No usable libvirtd at qemu:///system, and starting one did not work."""


def virsh_version(timeout: float = VIRSH_TIMEOUT) -> tuple[bool, str]:
    """Run `virsh -c qemu:///system version`: (answered, its output)."""
    try:
        result = subprocess.run(
            ["virsh", "-c", SYSTEM_URI, "version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise LibvirtdUnavailable(
            "virsh not found: install libvirt-clients (see docs / ENVIRONMENT.md)"
        ) from None
    except subprocess.TimeoutExpired:
        return False, f"virsh version did not answer within {timeout:.0f} s"
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def ensure_qemu_runs_as_root(conf: Path = QEMU_CONF) -> list[str]:
    """Append `user = "root"` / `group = "root"` to qemu.conf where not set; the lines added.

    A setting that is already active (whatever its value) is left alone, so
    calling this again changes nothing.
    """
    try:
        text = conf.read_text()
    except FileNotFoundError:
        text = ""
    added = []
    for key in ("user", "group"):
        if not re.search(_ACTIVE_SETTING.format(key), text, re.MULTILINE):
            added.append(f'{key} = "root"')
    if added:
        prefix = "" if not text or text.endswith("\n") else "\n"
        block = "# Added by resourced's tests: QEMU as root makes libvirt fast here.\n"
        with conf.open("a") as file:
            file.write(prefix + block + "".join(line + "\n" for line in added))
    return added


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _start_daemon(binary: str, log: list[str]) -> None:
    """Run `binary -d` (it forks and returns once the daemon is up or has failed)."""
    # Output to a file, not a pipe: a daemon that kept the pipe would block us.
    with tempfile.TemporaryFile("w+") as output:
        try:
            result = subprocess.run(
                [binary, "-d"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=VIRSH_TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            raise LibvirtdUnavailable(
                f"{binary} not found: install libvirt-daemon-system (see ENVIRONMENT.md)"
            ) from None
        except subprocess.TimeoutExpired:
            log.append(f"{binary} -d did not return within {VIRSH_TIMEOUT:.0f} s")
            return
        output.seek(0)
        said = output.read().strip()
    # A non-zero exit is not fatal by itself: another process may have started
    # the daemon at the same moment (then ours fails on the pid file lock).
    log.append(f"{binary} -d exited with {result.returncode}" + (f": {said}" if said else ""))


def _log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(none)"


def ensure_libvirtd(timeout: float = START_TIMEOUT) -> None:
    """Make sure `qemu:///system` answers, starting virtlogd and libvirtd if needed."""
    answered, said = virsh_version()
    if answered:
        return
    if os.geteuid() != 0:
        raise LibvirtdUnavailable(
            f"libvirtd does not answer at {SYSTEM_URI} ({said}) and only root may start it"
        )
    log = [f"virsh version first said: {said}"]
    added = ensure_qemu_runs_as_root()
    if added:
        log.append(f"appended to {QEMU_CONF}: {', '.join(added)}")
    if not _socket_answers(VIRTLOGD_SOCKET):
        _start_daemon("virtlogd", log)
    if not _socket_answers(LIBVIRTD_SOCKET):
        _start_daemon("libvirtd", log)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        answered, said = virsh_version(max(1.0, min(VIRSH_TIMEOUT, remaining)))
        if answered:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL)  # virsh can fail fast (no socket yet): don't spin
    log.append(f"virsh version last said: {said}")
    raise LibvirtdUnavailable(
        f"libvirtd did not answer at {SYSTEM_URI} within {timeout:.0f} s.\n"
        + "\n".join(log)
        + f"\n--- tail of {LIBVIRTD_LOG} ---\n{_log_tail(LIBVIRTD_LOG)}"
    )


#: Devices for `demo_domain_xml`: a PTY serial console (and `<console>`), VNC on a
#: socket of libvirt's choosing, and VGA.
PTY_CONSOLE_AND_VNC = """\
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <graphics type='vnc'>
      <listen type='socket'/>
    </graphics>
    <video>
      <model type='vga'/>
    </video>"""


def boot_image(prefix: str) -> tuple[Path, Path]:
    """A new directory under /tmp holding the demo boot sector, both readable by
    libvirt's QEMU (which runs as another user): the directory and the image."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    directory.chmod(0o755)
    image = directory / "boot.img"
    image.write_bytes(build_boot_sector())
    image.chmod(0o644)
    return directory, image


def demo_domain_xml(name: str, image: Path, devices: str) -> str:
    """A transient TCG domain booting the demo boot sector from `image` (a floppy),
    with `devices` (XML elements) added to its `<devices>`."""
    return f"""\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>16</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='fd'/>
  </os>
  <devices>
    <disk type='file' device='floppy'>
      <driver name='qemu' type='raw'/>
      <source file='{image}'/>
      <target dev='fda' bus='fdc'/>
    </disk>
{devices}
  </devices>
</domain>
"""


class OtherConsoleSession:
    """Another program's console session on a domain, as `virsh console [--force]`
    and virt-manager open it: `virDomainOpenConsole(dom, NULL, stream, flags)` on a
    connection of its own. Blocking calls: run them in a thread.

    Why not `virsh console` itself: it needs a terminal, and on a terminal it
    starts polkit's `pkttyagent` and puts the terminal in raw mode; in CI that
    left it short of ever calling virDomainOpenConsole, so its verdict never came.
    """

    def __init__(self, name: str) -> None:
        self.connection = libvirt.open(SYSTEM_URI)
        self.domain = self.connection.lookupByName(name)
        self.stream: Any = None

    def open(self, *, force: bool = False) -> str | None:
        """Open the domain's first console: None if libvirt let us in, else its refusal."""
        stream = self.connection.newStream(0)
        flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0
        try:
            self.domain.openConsole(None, stream, flags)
        except libvirt.libvirtError as error:
            return str(error)
        self.stream = stream
        return None

    def close(self) -> None:
        """End the session (libvirt unlocks the console) and the connection."""
        if self.stream is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.stream.abort()
            self.stream = None
        with contextlib.suppress(libvirt.libvirtError):
            self.connection.close()


def other_console_refusal(name: str) -> str | None:
    """Try to open `name`'s console as another program would: libvirt's refusal,
    or None if it let us in (the session is closed again at once)."""
    session = OtherConsoleSession(name)
    try:
        return session.open()
    finally:
        session.close()
