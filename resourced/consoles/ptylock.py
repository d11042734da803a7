"""UUCP-style lock files for PTYs, the arbitration libvirt uses for character devices.

Before libvirt opens a domain's PTY for a console session it checks for a lock
file named after the device (`/dev/pts/3` -> `/var/lock/LCK.._pts_3`): if the
file names a process that is alive, the device is taken and it refuses;
otherwise (no file, an unreadable one, a dead process) it replaces the file with
its own PID, as ten right-aligned digits and a newline (the Filesystem
Hierarchy Standard's format), and removes it when the session ends. A PTY given
to the gateway directly honours the same files, so that the gateway and `virsh
console`, `minicom` or `screen` on the same device do not silently split its
output between them.

This is advisory, as it is for libvirt: a program that does not look at the
files is not stopped. Where the lock directory is missing or not writable (an
unprivileged user on most systems), no lock is taken, as libvirt does for its
session daemon. It is not an `fcntl` lock and has nothing to do with the
terminal's own exclusive mode (`TIOCEXCL`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

log = logging.getLogger(__name__)

#: Where libvirt (as built by Debian and Fedora) and the serial-line tools keep
#: device lock files.
LOCK_DIR = "/var/lock"
#: Longest lock file read (a PID line is 11 bytes).
MAX_LOCK_FILE = 64


class PtyLocked(OSError):
    """Another live process holds the device's lock file."""

    def __init__(self, device: str, path: str, pid: int) -> None:
        super().__init__(
            errno.EBUSY,
            f"{device} is locked by lock file {path}, held by process {pid} "
            "(virsh console, minicom, screen?); it is not opened until that ends",
        )
        self.device = device
        self.path = path
        self.pid = pid


def lock_path(device: str, directory: str = LOCK_DIR) -> str:
    """The lock file for `device`: `/dev/` dropped, slashes made underscores."""
    name = device[len("/dev") :] if device.startswith("/dev/") else device
    return os.path.join(directory, "LCK.." + name.replace("/", "_"))


def holder(path: str) -> int | None:
    """The live process a lock file names, or None (no file, garbage, a dead PID)."""
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_LOCK_FILE)
    except OSError:
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, someone else's
    return pid


def acquire(device: str, directory: str = LOCK_DIR) -> str | None:
    """Take `device`'s lock for this process: the lock file's path, or None where
    no lock can be taken here (see the module docstring). Raises `PtyLocked` if a
    live process holds it; a stale file (a dead process, garbage) is taken over."""
    path = lock_path(device, directory)
    pid = holder(path)
    if pid is not None:
        raise PtyLocked(device, path, pid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        # Someone took it between our look and now.
        raise PtyLocked(device, path, holder(path) or 0) from None
    except (PermissionError, FileNotFoundError) as err:
        log.debug("no lock file for %s in %s (%s)", device, directory, err.strerror)
        return None
    try:
        os.write(fd, b"%10d\n" % os.getpid())
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def release(path: str | None) -> None:
    """Remove a lock file `acquire()` created (if it still names us)."""
    if path is not None and holder(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
