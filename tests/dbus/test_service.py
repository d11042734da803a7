"""The service on a real private bus, started by D-Bus activation, in front of a
real gateway and QEMU guest: the script path (busctl), the app path (fds with
dbus-fast), PTYs, named errors, access control, idle exit and re-activation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dbus_fast import MessageType, Variant

from tests.dbus.conftest import (
    BUS_NAME,
    ROOT,
    TIMEOUT,
    GatewayGuest,
    Session,
    call,
    ok,
    read_fd_until,
    type_until_echoed,
)

MANAGER = f"{BUS_NAME}.Manager"
GUEST = f"{BUS_NAME}.Guest"
CONSOLE = f"{BUS_NAME}.Console"
ERROR = f"{BUS_NAME}.Error."
SERIAL = f"{ROOT}/guests/demo/consoles/serial0"
BANNER = b"resourced demo guest"


async def until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.05)


async def add_demo(session: Session, gateway: GatewayGuest) -> None:
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "AddGuest", "ssa{sv}", "demo", gateway.address, "0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f'o "{ROOT}/guests/demo"'

    def consoles_published() -> bool:
        out = session.busctl(
            "call", BUS_NAME, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
        ).stdout
        return SERIAL in out and "/consoles/monitor" in out

    await until(consoles_published, "consoles published")


async def test_script_path_with_busctl(session: Session, gateway_guest: GatewayGuest) -> None:
    """AddGuest, GetManagedObjects, OpenPty then a real exchange on the PTY, Write,
    ReadHistory: all with the real busctl, the service started by activation."""
    await add_demo(session, gateway_guest)
    result = session.busctl("call", BUS_NAME, SERIAL, CONSOLE, "OpenPty", "a{sv}", "0")
    assert result.returncode == 0, result.stderr
    path = re.fullmatch(r's "(/dev/pts/\d+)"', result.stdout.strip())
    assert path is not None, result.stdout
    pty_path = path.group(1)
    info = os.stat(pty_path)
    assert info.st_uid == os.getuid()
    assert info.st_mode & 0o777 == 0o600
    fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY)
    try:
        seen = await asyncio.to_thread(read_fd_until, fd, BANNER)  # history first
        os.write(fd, b"pty-typed")
        await asyncio.to_thread(read_fd_until, fd, b"pty-typed", seen)  # the guest echoes
        # Write from the shell: bytes as busctl takes them.
        typed = b"busctl-typed"
        result = session.busctl(
            "call",
            BUS_NAME,
            SERIAL,
            CONSOLE,
            "Write",
            "aya{sv}",
            str(len(typed)),
            *[str(b) for b in typed],
            "0",
        )
        assert result.returncode == 0, result.stderr
        await asyncio.to_thread(read_fd_until, fd, typed)
    finally:
        os.close(fd)
    result = session.busctl(
        "call", BUS_NAME, SERIAL, CONSOLE, "ReadHistory", "a{sv}", "1", "max-bytes", "u", "4096"
    )
    assert result.returncode == 0, result.stderr
    numbers = [int(n) for n in result.stdout.split()[2:]]
    history = bytes(numbers)
    assert BANNER in history
    assert b"pty-typed" in history
    assert typed in history
    # ClosePty: the path goes away.
    result = session.busctl("call", BUS_NAME, SERIAL, CONSOLE, "ClosePty", "sa{sv}", pty_path, "0")
    assert result.returncode == 0, result.stderr


async def test_named_errors_for_bad_input(session: Session, gateway_guest: GatewayGuest) -> None:
    await add_demo(session, gateway_guest)
    bus = await session.client()
    b = lambda value: Variant("b", value)  # noqa: E731
    s = lambda value: Variant("s", value)  # noqa: E731
    cases = [
        (f"{ROOT}/guests/nope", GUEST, "Connect", "a{sv}", [{}], "NoSuchGuest"),
        (f"{ROOT}/guests/demo/consoles/nope", CONSOLE, "OpenPty", "a{sv}", [{}], "NoSuchConsole"),
        (SERIAL, CONSOLE, "OpenPty", "a{sv}", [{"colour": s("red")}], "InvalidArgument"),
        (SERIAL, CONSOLE, "OpenPty", "a{sv}", [{"history": s("yes")}], "InvalidArgument"),
        (SERIAL, CONSOLE, "ReadHistory", "s", ["x"], "InvalidArgument"),
        (SERIAL, CONSOLE, "Write", "aya{sv}", [b"x" * (1024 * 1024 + 1), {}], "InvalidArgument"),
        (ROOT, MANAGER, "AddGuest", "ssa{sv}", ["bad", "nonsense::x", {}], "InvalidArgument"),
        (ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", "unix:/x", {}], "InvalidArgument"),
        (
            ROOT,
            MANAGER,
            "AddGuest",
            "ssa{sv}",
            ["t", "unix:/x", {"tls": s("maybe")}],
            "InvalidArgument",
        ),
        (
            ROOT,
            MANAGER,
            "AddGuest",
            "ssa{sv}",
            ["t", "unix:/x", {"persist": s("no")}],
            "InvalidArgument",
        ),
        (
            ROOT,
            MANAGER,
            "AddGuest",
            "ssa{sv}",
            ["t", "unix:/x", {"password-file": s("/nonexistent")}],
            "InvalidArgument",
        ),
        (ROOT, MANAGER, "RemoveGuest", "oa{sv}", [f"{ROOT}/guests/zz", {}], "NoSuchGuest"),
        (SERIAL, CONSOLE, "ClosePty", "sa{sv}", ["/dev/pts/999", {}], "InvalidArgument"),
        (
            SERIAL,
            CONSOLE,
            "Open",
            "a{sv}",
            [{"read-only": b(True), "force": s("x")}],
            "InvalidArgument",
        ),
    ]
    try:
        for path, interface, member, signature, body, error in cases:
            reply = await call(bus, path, interface, member, signature, body)
            assert reply.message_type is MessageType.ERROR, (member, body)
            assert reply.error_name == ERROR + error, (member, reply.error_name, reply.body)
            assert reply.body, reply
            assert len(reply.body[0]) > 10, reply.body  # a sentence
            assert "Traceback" not in reply.body[0]
    finally:
        bus.disconnect()
    # busctl shows the sentence and fails.
    result = session.busctl(
        "call", BUS_NAME, f"{ROOT}/guests/demo/consoles/nope", CONSOLE, "OpenPty", "a{sv}", "0"
    )
    assert result.returncode != 0
    assert "no console" in result.stderr
    # The service is still there, the guest unaffected.
    still = session.busctl("get-property", BUS_NAME, f"{ROOT}/guests/demo", GUEST, "State")
    assert still.stdout.strip() == 's "connected"'


async def test_apps_share_a_console_through_fds(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    """Two apps on one console plus a PTY all see the same output; a late app gets
    the history; exclusive and force."""
    await add_demo(session, gateway_guest)
    bus = await session.client()
    try:

        async def open_console(**options: Variant) -> socket.socket:
            reply = await call(bus, SERIAL, CONSOLE, "Open", "a{sv}", [options])
            assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
            sock = socket.socket(fileno=reply.unix_fds[reply.body[0]])
            sock.setblocking(True)
            return sock

        first = await open_console()
        second = await open_console(history=Variant("b", False))
        (pty_path,) = ok(await call(bus, SERIAL, CONSOLE, "OpenPty", "a{sv}", [{}]))
        pty_fd = os.open(str(pty_path), os.O_RDWR | os.O_NOCTTY)
        try:
            await asyncio.to_thread(read_fd_until, first.fileno(), BANNER)
            await asyncio.to_thread(read_fd_until, pty_fd, BANNER)
            first.sendall(b"shared-echo")
            for fd in (first.fileno(), second.fileno(), pty_fd):
                await asyncio.to_thread(read_fd_until, fd, b"shared-echo")
            count = ok(
                await call(
                    bus,
                    SERIAL,
                    "org.freedesktop.DBus.Properties",
                    "Get",
                    "ss",
                    [CONSOLE, "OpenCount"],
                )
            )
            assert count[0].value == 3
            late = await open_console()
            seen = await asyncio.to_thread(read_fd_until, late.fileno(), b"shared-echo")
            assert BANNER in seen
            late.close()
            # exclusive while others have it open: Busy, nothing else disturbed.
            reply = await call(
                bus, SERIAL, CONSOLE, "Open", "a{sv}", [{"exclusive": Variant("b", True)}]
            )
            assert reply.error_name == ERROR + "Busy", reply.body
            # force: the others are closed (they read EOF), the new one holds it alone.
            forced = await open_console(exclusive=Variant("b", True), force=Variant("b", True))
            for sock in (first, second):
                sock.settimeout(TIMEOUT)
                data = b"x"
                while data:
                    data = await asyncio.to_thread(sock.recv, 4096)
            reply = await call(bus, SERIAL, CONSOLE, "Open", "a{sv}", [{}])
            assert reply.error_name == ERROR + "Busy", reply.body
            forced.sendall(b"after-force")
            await asyncio.to_thread(read_fd_until, forced.fileno(), b"after-force")
            forced.close()
        finally:
            os.close(pty_fd)
            first.close()
            second.close()
    finally:
        bus.disconnect()


async def test_caller_without_fd_passing_gets_an_error(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    await add_demo(session, gateway_guest)
    bus = await session.client(negotiate_unix_fd=False)
    try:
        reply = await call(bus, SERIAL, CONSOLE, "Open", "a{sv}", [{}])
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == ERROR + "Unsupported"
        assert "fd" in reply.body[0]
    finally:
        bus.disconnect()


async def test_another_user_is_refused(session: Session, gateway_guest: GatewayGuest) -> None:
    await add_demo(session, gateway_guest)
    result = session.run(
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "busctl",
        f"--address={session.address}",
        "call",
        BUS_NAME,
        SERIAL,
        CONSOLE,
        "OpenPty",
        "a{sv}",
        "0",
    )
    assert result.returncode != 0
    assert "may not use it" in result.stderr, result.stderr
    mine = session.busctl("get-property", BUS_NAME, SERIAL, CONSOLE, "Name")
    assert mine.stdout.strip() == 's "serial0"'


async def test_idle_exit_and_reactivation(session: Session, gateway_guest: GatewayGuest) -> None:
    """A service whose guests are all remembered exits when idle; one that holds a
    guest added at run time without persist does not (it would forget it)."""
    session.write_config("[service]\nidle-exit = 1\n[guests]\nidle-timeout = 0.5\n")
    await add_demo(session, gateway_guest)  # not persisted: keeps the service up
    await asyncio.sleep(3)
    assert session.service_pid() is not None
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "RemoveGuest", "oa{sv}", f"{ROOT}/guests/demo", "0"
    )
    assert result.returncode == 0, result.stderr
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "AddGuest", "ssa{sv}",
        "demo", gateway_guest.address, "1", "persist", "b", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = session.service_pid()
    assert first is not None

    def gone() -> bool:
        out = session.busctl(
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            BUS_NAME,
        ).stdout
        return out.strip() == "b false"

    await until(gone, "idle exit")
    with contextlib.suppress(ProcessLookupError):
        for _ in range(100):
            os.kill(first, 0)
            await asyncio.sleep(0.1)
    # Any call activates it again.
    result = session.busctl("get-property", BUS_NAME, ROOT, MANAGER, "Version")
    assert result.returncode == 0, result.stderr
    second = session.service_pid()
    assert second is not None
    assert second != first


async def test_resourcectl(session: Session, gateway_guest: GatewayGuest) -> None:
    added = session.resourcectl("add", "demo", gateway_guest.address)
    assert added.returncode == 0, added.stderr
    await add_demo_published(session)
    listing = session.resourcectl("list")
    assert "demo" in listing.stdout
    assert "serial0" in listing.stdout
    history = session.resourcectl("history", "demo", "serial0")
    assert BANNER.decode() in history.stdout
    missing = session.resourcectl("history", "demo", "nope")
    assert missing.returncode == 4
    assert "no console" in missing.stderr
    missing = session.resourcectl("status", "nobody-here")
    assert missing.returncode == 3
    pty = session.resourcectl("pty", "demo", "serial0")
    assert pty.returncode == 0
    assert pty.stdout.startswith("/dev/pts/")
    # console on a real terminal: the banner, type and see the echo, leave with Ctrl-]
    master, slave = os.openpty()
    process = subprocess.Popen(
        [f"{session.env['PATH'].split(':')[0]}/resourcectl", "console", "demo", "serial0"],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=session.env,
    )
    os.close(slave)
    try:
        seen = await asyncio.to_thread(read_fd_until, master, BANNER)
        os.write(master, b"tty-typed")
        await asyncio.to_thread(read_fd_until, master, b"tty-typed", seen)
        os.write(master, b"\x1d")
        assert await asyncio.to_thread(process.wait, TIMEOUT) == 0
        assert process.stderr is not None
        assert b"Escape character is ^]" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
        os.close(master)


async def test_resourcectl_console_from_a_file_or_without_stdio(
    session: Session, gateway_guest: GatewayGuest, tmp_path: Path
) -> None:
    """`resourcectl console` with stdin from a file or /dev/null (which epoll
    refuses) types what the file holds and ends with status 0; with its stdin or
    stdout closed it says so in one line. Neither prints a traceback (issue #9,
    kind 2: every command)."""
    added = session.resourcectl("add", "demo", gateway_guest.address)
    assert added.returncode == 0, added.stderr
    await add_demo_published(session)
    resourcectl = f"{session.env['PATH'].split(':')[0]}/resourcectl"
    typed = tmp_path / "typed"
    typed.write_bytes(b"file-typed\r")
    for source in (typed, Path("/dev/null")):
        with source.open("rb") as stdin:
            result = session.run(resourcectl, "console", "demo", "serial0", stdin=stdin)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    # The guest echoed the file's line: it is in the console's history.
    await until(
        lambda: "file-typed" in session.resourcectl("history", "demo", "serial0").stdout,
        "the file's line echoed",
    )
    for redirect in ("<&-", ">&-"):
        result = session.run("sh", "-c", f"exec {resourcectl} console demo serial0 {redirect}")
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            "resourcectl: console needs a standard input and output (one of them is closed)\n"
        )


async def test_resourcectl_arguments_that_are_not_utf8(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    """A terminal or file system in another encoding than UTF-8 (issue #9, kind 3):
    `write` types the argument's bytes as the shell passed them (Latin-1 é is the
    one byte E9 in the guest's echo); a guest name or file path that is not UTF-8,
    which D-Bus cannot carry, is one line and InvalidArgument's status."""
    added = session.resourcectl("add", "demo", gateway_guest.address)
    assert added.returncode == 0, added.stderr
    await add_demo_published(session)
    resourcectl = f"{session.env['PATH'].split(':')[0]}/resourcectl".encode()
    await until(  # the guest has booted: it echoes from now on
        lambda: BANNER.decode() in session.resourcectl("history", "demo", "serial0").stdout,
        "the banner",
    )
    result = session.run(resourcectl, b"write", b"demo", b"serial0", b"latin-caf\xe9")
    assert result.returncode == 0, result.stderr

    def echoed() -> bool:
        history = session.run(
            resourcectl, b"history", b"demo", b"serial0", errors="surrogateescape"
        )
        return b"latin-caf\xe9" in os.fsencode(history.stdout)

    await until(echoed, "the Latin-1 bytes echoed")
    for argv in (
        [b"status", b"caf\xe9"],
        [b"add", b"caf\xe9", b"unix:/nonexistent"],
        [b"audio", b"demo", b"record", b"/tmp/caf\xe9.wav"],
    ):
        result = session.run(resourcectl, *argv, errors="surrogateescape")
        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith("is not UTF-8 text, and D-Bus carries only UTF-8\n")
        assert "Traceback" not in result.stderr


async def add_demo_published(session: Session) -> None:
    def published() -> bool:
        return "serial0" in session.resourcectl("list").stdout

    await until(published, "consoles")


async def test_plain_qemu_has_no_consoles_and_says_why(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    """A guest added at QEMU's own VNC socket (no gateway): it connects at once and
    has no consoles; asking for one names the reason."""
    bus = await session.client()
    try:
        address = f"unix:{gateway_guest.guest.vnc_path}"
        (path,) = ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["plain", address, {}]))
        started = time.monotonic()
        ok(await call(bus, path, GUEST, "Connect", "a{sv}", [{}]))
        # The console list is settled by the server's first update, not a timeout.
        assert time.monotonic() - started < 8.0
        result = session.busctl("get-property", BUS_NAME, path, GUEST, "Consoles")
        assert result.stdout.strip() == "ao 0"
        missing = session.resourcectl("history", "plain", "serial0")
        assert missing.returncode == 4
        assert "no console extension" in missing.stderr
    finally:
        bus.disconnect()


async def test_introspection_marks_constant_properties(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    await add_demo(session, gateway_guest)
    result = session.busctl("introspect", BUS_NAME, SERIAL, CONSOLE)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(".")}
    assert "const" in lines[".Name"]
    assert "const" in lines[".Kind"]
    assert "emits-change" in lines[".OpenCount"]
    assert "emits-change" in lines[".Available"]


async def test_persisted_guest_comes_back_after_a_restart(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "AddGuest", "ssa{sv}",
        "kept", gateway_guest.address, "1", "persist", "b", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = (session.config_dir / "guests.toml").read_text()
    assert 'name = "kept"' in saved
    assert gateway_guest.address in saved
    first = session.service_pid()
    assert first is not None
    os.kill(first, signal.SIGTERM)  # a normal stop

    def stopped() -> bool:
        out = session.busctl(
            "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
            "NameHasOwner", "s", BUS_NAME,
        ).stdout  # fmt: skip
        return out.strip() == "b false"

    await until(stopped, "the service to stop")
    # Activated again, it reads guests.toml: the guest and its consoles are back.
    await until(lambda: "serial0" in session.resourcectl("list").stdout, "the kept guest")
    assert session.service_pid() not in (None, first)
    # A broken config is refused with the file and key named, not a traceback.
    session.write_config("[service]\nidle-exit = 'soon'\n")
    os.kill(session.service_pid() or 0, signal.SIGTERM)
    await until(stopped, "the service to stop again")
    broken = session.busctl("get-property", BUS_NAME, ROOT, MANAGER, "Version")
    assert broken.returncode != 0
    log = (session.directory / "daemon.log").read_text()
    assert "idle-exit must be a number" in log
    assert "Traceback" not in log


async def test_what_a_new_user_ran_into(session: Session, gateway_guest: GatewayGuest) -> None:
    """Each a named error or the documented behaviour (found by trying the README)."""
    await add_demo(session, gateway_guest)
    # Introspecting the root works (no interface listed twice).
    result = session.busctl("introspect", BUS_NAME, ROOT)
    assert result.returncode == 0, result.stderr
    assert "org.freedesktop.DBus.ObjectManager" in result.stdout
    # persist keeps no plain-text password.
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "AddGuest", "ssa{sv}", "p", "unix:/x",
        "2", "persist", "b", "true", "password", "s", "secret",
    )  # fmt: skip
    assert result.returncode != 0
    assert "password-file" in result.stderr
    # An empty libvirt URI is refused, not followed.
    result = session.busctl("call", BUS_NAME, ROOT, MANAGER, "AddLibvirt", "sa{sv}", "", "0")
    assert result.returncode != 0
    assert "libvirt URI" in result.stderr
    # A URI libvirt cannot open is NotConnected and dropped: nothing says it is
    # tried again, and it is not followed.
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "AddLibvirt", "sa{sv}", "bogus:///x", "0"
    )  # fmt: skip
    assert result.returncode != 0
    assert "NotConnected" in result.stderr or "bogus" in result.stderr, result.stderr
    result = session.busctl("get-property", BUS_NAME, ROOT, MANAGER, "LibvirtConnections")
    assert "bogus" not in result.stdout, result.stdout
    assert "trying again" not in (session.directory / "daemon.log").read_text()
    # Write respects an exclusive open.
    bus = await session.client()
    try:
        reply = await call(
            bus, SERIAL, CONSOLE, "Open", "a{sv}", [{"exclusive": Variant("b", True)}]
        )
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        holder = socket.socket(fileno=reply.unix_fds[reply.body[0]])
        reply = await call(bus, SERIAL, CONSOLE, "Write", "aya{sv}", [b"x", {}])
        assert reply.error_name == ERROR + "Busy", reply.body
        holder.close()
    finally:
        bus.disconnect()
    # RemoveGuest forgets a persisted guest for good.
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "AddGuest", "ssa{sv}",
        "kept", gateway_guest.address, "1", "persist", "b", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert 'name = "kept"' in (session.config_dir / "guests.toml").read_text()
    result = session.busctl(
        "call", BUS_NAME, ROOT, MANAGER, "RemoveGuest", "oa{sv}", f"{ROOT}/guests/kept", "0"
    )
    assert result.returncode == 0, result.stderr
    assert "kept" not in (session.config_dir / "guests.toml").read_text()
    # resourced run with no session bus: one line, not a traceback.
    env = {k: v for k, v in session.env.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    result = subprocess.run(
        [f"{session.env['PATH'].split(':')[0]}/resourced", "run"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no session bus" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_wrong_password_is_authentication_failed(
    session: Session, gateway_guest: GatewayGuest, tmp_path: Path
) -> None:
    """A gateway that asks for a password: none, or a wrong one, is AuthenticationFailed."""
    password_file = tmp_path / "pw"
    password_file.write_text("right one\n")
    socket_path = gateway_guest.directory / "pw.sock"
    process = subprocess.Popen(
        [
            f"{session.env['PATH'].split(':')[0]}/resourced-gateway",
            "--vnc", f"unix:{gateway_guest.guest.vnc_path}",
            "--listen", f"unix:{socket_path}", "--socket-mode", "666",
            "--password-file", str(password_file),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await until(socket_path.exists, "the password gateway")
        wrong = tmp_path / "wrong"
        wrong.write_text("wrong\n")
        bus = await session.client()
        try:
            for name, options in (
                ("nopw", {}),
                ("badpw", {"password-file": Variant("s", str(wrong))}),
            ):
                (path,) = ok(
                    await call(
                        bus,
                        ROOT,
                        MANAGER,
                        "AddGuest",
                        "ssa{sv}",
                        [name, f"unix:{socket_path}", options],
                    )
                )
                reply = await call(bus, str(path), GUEST, "Connect", "a{sv}", [{}])
                assert reply.error_name == ERROR + "AuthenticationFailed", (name, reply.body)
            result = session.resourcectl("connect", "nopw")
            assert result.returncode == 8, result.stderr
        finally:
            bus.disconnect()
    finally:
        process.terminate()
        process.wait(TIMEOUT)


async def test_console_whose_host_end_left_the_gateway_comes_back(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    """The gateway's serial0 loses its host end (QEMU moves the chardev away with
    `chardev-change`, typed on the monitor through the service): the gateway
    closes serial0 for the service (CLOSED, backend error), and the service opens
    it again by itself, so that once the chardev is back an app on serial0 types
    and sees the echo, with no reconnection of the guest."""
    await add_demo(session, gateway_guest)
    bus = await session.client()
    monitor_path = SERIAL.replace("serial0", "monitor")
    try:

        async def open_console(path: str) -> socket.socket:
            reply = await call(bus, path, CONSOLE, "Open", "a{sv}", [{}])
            assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
            sock = socket.socket(fileno=reply.unix_fds[reply.body[0]])
            sock.setblocking(True)
            return sock

        monitor = await open_console(monitor_path)
        serial = await open_console(SERIAL)
        try:
            await asyncio.to_thread(read_fd_until, serial.fileno(), BANNER)
            original = gateway_guest.guest.serial_path
            moved = gateway_guest.guest.workdir / "moved.sock"
            for path in (moved, original):
                monitor.sendall(
                    f"chardev-change serial0 socket,path={path},server=on,wait=off\n".encode()
                )
                await asyncio.to_thread(read_fd_until, monitor.fileno(), str(path).encode())
            await asyncio.to_thread(type_until_echoed, serial, b"after-the-move")
        finally:
            monitor.close()
            serial.close()
    finally:
        bus.disconnect()


async def test_the_service_stops_when_its_bus_goes(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    """The bus's daemon dies (the session ended) while an open console holds the
    guest's connection: the service stops too, instead of running for ever with
    nobody able to reach it."""
    session.write_config("[service]\nidle-exit = 0\n")
    await add_demo(session, gateway_guest)
    pty = session.busctl("call", BUS_NAME, SERIAL, CONSOLE, "OpenPty", "a{sv}", "0")
    assert pty.returncode == 0, pty.stderr
    pid = session.service_pid()
    assert pid is not None
    session.daemon.kill()
    session.daemon.wait()

    def stopped() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/status").read_text().count("zombie") > 0

    await until(stopped, "the service to stop once its bus is gone")


def test_resourcectl_names_the_bus_it_cannot_reach(tmp_path: Path) -> None:
    """A stale DBUS_SESSION_BUS_ADDRESS (the tour's private bus after Ctrl-C) or a
    wrong --bus: the message names the address tried, in words, with status 69."""
    resourcectl = str(Path(sys.executable).parent / "resourcectl")
    gone = f"unix:path={tmp_path}/bus"
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": gone}
    result = subprocess.run(
        [resourcectl, "list"], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert (result.returncode, result.stdout) == (69, "")
    assert result.stderr == (
        f"resourcectl: cannot reach the bus at {gone}: No such file or directory\n"
    )
    result = subprocess.run(
        [resourcectl, "--bus", "garbage", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert (result.returncode, result.stdout) == (69, "")
    assert result.stderr.startswith("resourcectl: cannot reach the bus at garbage: ")
