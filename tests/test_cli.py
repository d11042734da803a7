"""Our commands facing a broken environment: one clear line, never a traceback.

Issue #9: every command (`resourced-gateway`, `python -m resourced.rfb probe`,
`python -m resourced.demo`, `python -m resourced.demo.probe`, the tour of
`./scripts/run`; `resourced` and `resourcectl` are run against a real bus in
tests/dbus/test_service.py) turns the expected
failures of its environment (paths, permissions, ports in use, missing files,
unreachable libvirt, bad certificates, unreadable password files) into one line
`PROG: what failed: why` and a non-zero exit status, and leaves nothing
half-created. Each case is a real subprocess run. Only a bug prints a
traceback, followed by a line saying so (`run_command` in-process, last).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from resourced.cli import EXIT_BUG, read_password_file, run_command
from resourced.errors import ConfigurationError
from resourced.rfb.pixelformat import RGBX8888
from tests.certs import make_pki

TIMEOUT = 60.0


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def one_line(prog: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must fail cleanly; its one line, without `PROG: `."""
    code, _, err = await run(*args, env=env)
    assert code == 1, err
    assert "Traceback" not in err, err
    # The gateway logs as it starts; the failure is the one line not from logging.
    lines = [line for line in err.splitlines() if " INFO: " not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: "), err
    return lines[0].removeprefix(f"{prog}: ")


def gateway(*args: str) -> tuple[str, ...]:
    return ("-m", "resourced.gateway", *args)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Directly under /tmp: a socket path must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="rsd-cli-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# resourced-gateway
# ---------------------------------------------------------------------------


async def test_gateway_socket_path_too_long(short_dir: Path) -> None:
    """The issue's own case: a 144-byte path, which AF_UNIX cannot hold."""
    path = short_dir / ("s" * (144 - len(str(short_dir)) - 1))
    assert len(str(path)) == 144
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "unix:/nonexistent/vnc.sock", "--listen", f"unix:{path}"),
    )
    assert line == f"cannot listen on unix:{path}: AF_UNIX path too long"
    assert os.listdir(short_dir) == []


async def test_gateway_socket_directory_missing(short_dir: Path) -> None:
    path = short_dir / "no" / "gw.sock"
    line = await one_line(
        "resourced-gateway", *gateway("--vnc", "unix:/x", "--listen", f"unix:{path}")
    )
    assert line == f"cannot listen on unix:{path}: No such file or directory"


async def test_gateway_socket_directory_not_writable(short_dir: Path) -> None:
    # As root, permissions do not stop a bind: a directory on a read-only file
    # system does (/proc's are).
    line = await one_line(
        "resourced-gateway", *gateway("--vnc", "unix:/x", "--listen", "unix:/proc/gw.sock")
    )
    assert line.startswith("cannot listen on unix:/proc/gw.sock: ")


async def test_gateway_port_in_use_removes_the_socket_it_made(short_dir: Path) -> None:
    """The second --listen fails: the first one's socket is not left behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = await one_line(
            "resourced-gateway",
            *gateway(
                "--vnc",
                "unix:/x",
                "--listen",
                f"unix:{short_dir / 'first.sock'}",
                "--listen",
                f"127.0.0.1:{port}",
                "--insecure",
            ),
        )
    assert line.startswith(f"cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in line
    assert os.listdir(short_dir) == []


async def test_gateway_never_replaces_a_file_or_a_listening_socket(short_dir: Path) -> None:
    """A --listen path that holds a file (a typo away from someone's data) or a
    socket a server answers on is refused in one line, and left as it was."""
    data = short_dir / "notes.txt"
    data.write_text("keep me\n")
    line = await one_line(
        "resourced-gateway", *gateway("--vnc", "unix:/x", "--listen", f"unix:{data}")
    )
    assert line == (
        f"cannot listen on unix:{data}: something other than a socket is there (not replaced)"
    )
    assert data.read_text() == "keep me\n"
    live = short_dir / "live.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(live))
        server.listen()
        line = await one_line(
            "resourced-gateway", *gateway("--vnc", "unix:/x", "--listen", f"unix:{live}")
        )
        assert line == f"cannot listen on unix:{live}: another server is listening on it"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(live))  # still the same server's


async def test_gateway_takes_over_a_stale_socket(short_dir: Path) -> None:
    """A socket nobody answers on (a gateway that was killed) is replaced; on a
    clean exit the gateway removes its own socket."""
    path = short_dir / "gw.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *gateway("--vnc", "unix:/x", "--listen", f"unix:{path}"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(TIMEOUT):
            log = b""
            while b"fronting" not in log:
                line = await process.stderr.readline()
                assert line, log.decode()
                log += line
            reader, writer = await asyncio.open_unix_connection(str(path))
            assert await reader.readexactly(12) == b"RFB 003.008\n"
            writer.close()
    finally:
        process.terminate()
        async with asyncio.timeout(TIMEOUT):
            rest = await process.stderr.read()
            await process.wait()
    assert process.returncode == 0, rest.decode()
    assert not path.exists()


async def test_gateway_unknown_host() -> None:
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "unix:/x", "--listen", "no-such-host.invalid:5901", "--insecure"),
    )
    assert line.startswith("cannot listen on no-such-host.invalid:5901: ")


@pytest.mark.parametrize("option", ["--password-file", "--vnc-password-file"])
async def test_gateway_password_file_missing_or_unreadable(short_dir: Path, option: str) -> None:
    sock = f"unix:{short_dir / 'gw.sock'}"
    missing = short_dir / "missing"
    line = await one_line(
        "resourced-gateway", *gateway("--vnc", "unix:/x", "--listen", sock, option, str(missing))
    )
    assert line == f"cannot read the password file {missing}: No such file or directory"
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "unix:/x", "--listen", sock, option, str(short_dir)),
    )
    assert line == f"cannot read the password file {short_dir}: Is a directory"
    latin1 = short_dir / "latin1"
    latin1.write_bytes(b"p\xe4ss\n")
    line = await one_line(
        "resourced-gateway", *gateway("--vnc", "unix:/x", "--listen", sock, option, str(latin1))
    )
    assert line == f"the password file {latin1} is not UTF-8 text (byte 1)"
    assert os.listdir(short_dir) == [latin1.name]


async def test_gateway_bad_certificates(short_dir: Path) -> None:
    pki = make_pki(short_dir / "pki")
    sock = f"unix:{short_dir / 'gw.sock'}"
    missing = short_dir / "missing.pem"
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "unix:/x", "--listen", sock, "--tls-cert", str(missing), "--tls-key",
                 str(pki.server_key)),
    )  # fmt: skip
    assert line == (
        f"cannot load the TLS certificate {missing} with key {pki.server_key}: "
        "No such file or directory"
    )
    garbage = short_dir / "garbage.pem"
    garbage.write_text("not a certificate\n")
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "unix:/x", "--listen", sock, "--tls-cert", str(garbage), "--tls-key",
                 str(pki.server_key)),
    )  # fmt: skip
    assert line.startswith(f"cannot load the TLS certificate {garbage} with key ")
    assert "(_ssl.c" not in line
    # A key that is not the certificate's.
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "unix:/x", "--listen", sock, "--tls-cert", str(pki.server_cert),
                 "--tls-key", str(pki.client_key)),
    )  # fmt: skip
    assert line.startswith(f"cannot load the TLS certificate {pki.server_cert} with key ")
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "unix:/x", "--listen", sock, "--tls-cert", str(pki.server_cert),
                 "--tls-key", str(pki.server_key), "--tls-ca", str(missing)),
    )  # fmt: skip
    assert line == f"cannot load the CA certificate {missing}: No such file or directory"


async def test_gateway_bad_vnc_address(short_dir: Path) -> None:
    line = await one_line(
        "resourced-gateway",
        *gateway("--vnc", "host::notaport", "--listen", f"unix:{short_dir / 'gw.sock'}"),
    )
    assert "notaport" in line
    assert os.listdir(short_dir) == []


async def test_gateway_libvirt_unreachable(short_dir: Path) -> None:
    uri = f"qemu+unix:///system?socket={short_dir}/no-libvirt-sock"
    line = await one_line(
        "resourced-gateway",
        *gateway("--libvirt", uri, "--domain", "d", "--listen", f"unix:{short_dir / 'gw.sock'}"),
    )
    assert line.startswith(f"cannot connect to libvirt at {uri}: ")
    assert "No such file or directory" in line


# ---------------------------------------------------------------------------
# python -m resourced.rfb probe
# ---------------------------------------------------------------------------


def probe(*args: str) -> tuple[str, ...]:
    return ("-m", "resourced.rfb", "probe", *args)


async def test_probe_environment_failures(short_dir: Path) -> None:
    prog = "resourced probe"
    line = await one_line(prog, *probe(f"unix:{short_dir}/none.sock"))
    assert line == f"cannot connect to unix:{short_dir}/none.sock: No such file or directory"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        line = await one_line(prog, *probe(f"127.0.0.1::{port}"))
    assert line == f"cannot connect to 127.0.0.1::{port}: Connection refused"
    # localhost is ::1 and 127.0.0.1: asyncio joins the two failures; one reason is shown.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        line = await one_line(prog, *probe(f"localhost::{port}"))
    assert line in (
        f"cannot connect to localhost::{port}: Connection refused",
        # where ::1 is not configured, its failure differs from 127.0.0.1's
        f"cannot connect to localhost::{port}: Multiple exceptions: "
        f"[Errno 99] Connect call failed ('::1', {port}, 0, 0), "
        f"[Errno 111] Connect call failed ('127.0.0.1', {port})",
    )
    line = await one_line(prog, *probe("no-such-host.invalid::5900"))
    assert line.startswith("cannot connect to no-such-host.invalid::5900: ")
    assert "Unknown error" not in line
    line = await one_line(prog, *probe("fd:987"))
    assert line == "cannot connect to fd:987: Bad file descriptor"
    line = await one_line(prog, *probe("unix:/x", "--password-file", str(short_dir / "nope")))
    assert line == f"cannot read the password file {short_dir / 'nope'}: No such file or directory"
    line = await one_line(prog, *probe("unix:/x", "--rate", "0"))
    assert line == "bad audio format: rate must be 1..48000 Hz, not 0"


async def fake_rfb5_server(path: Path, seen: list[bytes]) -> asyncio.Server:
    """A server that greets as RealVNC 5 does, then speaks 3.8 with None."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"RFB 005.000\n")
            seen.append(await reader.readexactly(12))
            writer.write(b"\x01\x01")  # one security type: None
            seen.append(await reader.readexactly(1))
            writer.write(struct.pack("!I", 0))  # SecurityResult OK (3.8)
            seen.append(await reader.readexactly(1))  # ClientInit
            name = b"RealVNC 5"
            pixel_format = RGBX8888.serialize()
            writer.write(struct.pack("!HH", 64, 48) + pixel_format + struct.pack("!I", len(name)))
            writer.write(name)
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handler, str(path))


async def test_probe_against_an_rfb_5_server(short_dir: Path) -> None:
    """Issue #9: a server greeting with RFB 005.000 is answered 3.8, not refused."""
    seen: list[bytes] = []
    path = short_dir / "rfb5.sock"
    server = await fake_rfb5_server(path, seen)
    async with server:
        code, out, err = await run(*probe(f"unix:{path}"))
    assert code == 0, err
    assert seen[0] == b"RFB 003.008\n"
    assert seen[1] == b"\x01"
    assert "server:    RealVNC 5" in out
    assert "protocol:  RFB 3.8" in out


async def test_probe_leaves_no_empty_recording(short_dir: Path) -> None:
    """A server without QEMU audio: one line, and no WAV file of nothing."""
    path = short_dir / "rfb5.sock"
    wav = short_dir / "beep.wav"
    server = await fake_rfb5_server(path, [])
    async with server:
        line = await one_line(
            "resourced probe", *probe(f"unix:{path}", "--audio", str(wav), "--duration", "0.1")
        )
        assert line == "the server does not support QEMU audio"
        assert os.listdir(short_dir) == ["rfb5.sock"]
        line = await one_line(
            "resourced probe", *probe(f"unix:{path}", "--audio", "/proc/no/x.wav")
        )
        assert line == "/proc/no/x.wav: No such file or directory"


# ---------------------------------------------------------------------------
# python -m resourced.demo, python -m resourced.demo.probe
# ---------------------------------------------------------------------------


async def test_demo_without_qemu() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    for module in ("resourced.demo", "resourced.demo.probe"):
        args = ["--wav", "/tmp/rsd-never.wav"] if module.endswith("probe") else []
        line = await one_line("resourced demo", "-m", module, *args, env=env)
        assert line == "qemu-system-x86_64 not found: install the Debian package qemu-system-x86"


async def test_demo_workdir_unusable() -> None:
    line = await one_line("resourced demo", "-m", "resourced.demo", "--workdir", "/proc/no/dir")
    assert line.startswith("cannot start the guest: /proc/no")


async def test_demo_workdir_too_deep(short_dir: Path) -> None:
    deep = short_dir / ("d" * 100)
    line = await one_line("resourced demo", "-m", "resourced.demo", "--workdir", str(deep))
    assert "is too deep" in line


async def test_demo_probe_wav_directory_unusable() -> None:
    line = await one_line(
        "resourced demo", "-m", "resourced.demo.probe", "--wav", "/proc/no/beep.wav"
    )
    assert line.startswith("cannot make the directory for /proc/no/beep.wav: /proc/no: ")


async def test_tour_wav_directory_unusable() -> None:
    """`./scripts/run` (the tour) too: one line, before anything is started."""
    line = await one_line(
        "resourced demo", "-m", "resourced.demo.tour", "--once", "--wav", "/proc/no/beep.wav"
    )
    assert line.startswith("cannot make the folder for /proc/no/beep.wav: /proc/no: ")


async def test_bad_sizes_are_usage_errors(short_dir: Path) -> None:
    code, _, err = await run(
        *gateway("--vnc", "unix:/x", "--listen", f"unix:{short_dir / 'gw.sock'}", "--history", "-5")
    )
    assert code == 2  # argparse's usage error
    assert err.splitlines()[-1] == (
        "resourced-gateway: error: argument --history: -5 is not a positive size"
    )
    line = await one_line("resourced demo", "-m", "resourced.demo", "--tone-hz", "0")
    assert "tone" in line


@pytest.mark.parametrize(
    ("data", "password"),
    [
        ("pässwö\n".encode(), "pässwö"),  # echo pässwö > F
        ("pässwö\r\n".encode(), "pässwö"),  # written on Windows
        ("pässwö".encode(), "pässwö"),  # printf
        ("\ufeffpässwö\n".encode(), "pässwö"),  # an editor's byte order mark
        (b" a b \n\n", " a b "),  # spaces are the password's own
    ],
)
def test_password_file_forms(tmp_path: Path, data: bytes, password: str) -> None:
    path = tmp_path / "password"
    path.write_bytes(data)
    assert read_password_file(path) == password


def test_password_file_of_two_lines_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_bytes(b"one\ntwo\n")
    with pytest.raises(ConfigurationError, match="more than one line"):
        read_password_file(path)


# ---------------------------------------------------------------------------
# The shared part: a bug is the only traceback
# ---------------------------------------------------------------------------


def test_a_bug_prints_its_traceback_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> int:
        raise KeyError("oops")

    assert run_command("prog", body) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "KeyError: 'oops'" in err
    assert err.splitlines()[-1].startswith("prog: this is a bug in resourced")


def test_expected_failures_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse() -> int:
        raise ConfigurationError("no such thing")

    def missing() -> int:
        raise FileNotFoundError(2, "No such file or directory", "/etc/x")

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command("prog", refuse) == 1
    assert run_command("prog", missing) == 1
    assert run_command("prog", interrupted) == 130
    assert run_command("prog", lambda: 0) == 0
    assert capsys.readouterr().err.splitlines() == [
        "prog: no such thing",
        "prog: /etc/x: No such file or directory",
    ]
