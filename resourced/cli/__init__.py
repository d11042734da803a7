"""What every resourced command does with a failure, in one place.

A command (`resourced-gateway`, `python -m resourced.rfb probe`, `resourced`,
`resourcectl`, `python -m resourced.demo`, `python -m resourced.demo.probe`, the
tour) runs its body through `run_command`. Failures of the environment — our
own `ResourcedError`s and the operating system's `OSError`s (missing files and
directories, permissions, ports in use, socket paths too long, unreachable
hosts, bad certificates) — become one line on stderr, `PROG: what failed: why`,
and exit status 1. Anything else is a bug in resourced: its traceback is
printed, followed by a line saying so, and the exit status is 70 (EX_SOFTWARE).
Ctrl-C exits with 130, quietly.

`failing_as` names what was being done when an `OSError` says only why (a
`bind()` or `connect()` error carries no path), and `read_password_file` reads
the password files the commands take. This module is not a command-line parser:
each command keeps its own argparse.
"""

from __future__ import annotations

import contextlib
import io
import re
import ssl
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from resourced.errors import ConfigurationError, ResourcedError

_SSL_SOURCE_LINE = re.compile(r" \(_ssl\.c:\d+\)$")

#: Exit status for a bug in resourced (sysexits.h EX_SOFTWARE).
EXIT_BUG = 70
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def describe_os_error(err: OSError) -> str:
    """An OSError as a person reads it: `PATH: reason` or the reason alone."""
    if isinstance(err, TimeoutError) and not err.strerror:
        return str(err) or "timed out"
    reason = err.strerror or str(err) or type(err).__name__
    if isinstance(err, ssl.SSLError):
        # "[SSL] PEM lib (_ssl.c:3905)": OpenSSL's words without CPython's line number.
        reason = _SSL_SOURCE_LINE.sub("", reason)
    if err.filename is not None:
        where = str(err.filename)
        if err.filename2 is not None:
            where += f" -> {err.filename2}"
        return f"{where}: {reason}"
    return reason


@contextlib.contextmanager
def failing_as(what: str) -> Iterator[None]:
    """Turn an OSError inside into `ConfigurationError("WHAT: reason")`."""
    try:
        yield
    except OSError as err:
        raise ConfigurationError(f"{what}: {describe_os_error(err)}") from err


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body; return its exit status, failures told in one line."""
    # A peer's text (a desktop name) may not fit the terminal's encoding (the C
    # locale's ASCII): shown escaped, it is no reason to fail.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return body()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ResourcedError as err:
        _say(prog, str(err))
    except OSError as err:
        _say(prog, describe_os_error(err))
    except Exception:
        traceback.print_exc()
        _say(prog, "this is a bug in resourced (the traceback above says where); please report it")
        return EXIT_BUG
    return 1


def _say(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def read_password_file(path: Path) -> str:
    """The password in a file: its UTF-8 text without the line ending(s) after it.

    UTF-8 because that is what the password's bytes are to QEMU, libvirt and
    gtk-vnc (VNC Authentication keys DES with the first 8 of them), whatever the
    locale of the machine reading the file.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigurationError(f"cannot read the password file {path}: {reason}") from err
    try:
        text = data.decode("utf-8-sig")  # an editor's byte order mark is not the password
    except UnicodeDecodeError as err:
        raise ConfigurationError(
            f"the password file {path} is not UTF-8 text (byte {err.start})"
        ) from None
    password = text.rstrip("\r\n")
    if "\n" in password or "\r" in password:
        raise ConfigurationError(f"the password file {path} holds more than one line")
    return password
