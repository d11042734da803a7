"""Run the demo guest under real QEMU (TCG) from asyncio.

`QemuGuest` starts `qemu-system-x86_64` on the boot sector from
`resourced.demo.bootsector`, with VNC (optionally with PC-speaker audio, a
password and x509 TLS), the serial console, the human monitor and QMP all on
Unix sockets in the guest's own work directory, and drives it over QMP.

It is a harness for tests and the README's demo, not a VM manager: it knows one
fixed machine, starts it once, and leaves everything it makes in `workdir`
(the caller owns and removes that directory).

Unix socket paths are limited to 107 bytes (sun_path is 108 bytes with its
NUL), so the work directory must be short: the socket names are short and
fixed, and a directory too deep for them is refused with GuestError rather
than silently moved elsewhere. Use something like `tempfile.mkdtemp(dir="/tmp")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from resourced.demo.bootsector import DEFAULT_BANNER, build_boot_sector
from resourced.errors import ResourcedError

__all__ = [
    "QEMU_BINARY",
    "GuestConfig",
    "GuestError",
    "QemuGuest",
]

QEMU_BINARY: Final = "qemu-system-x86_64"

_SUN_PATH_MAX: Final = 107  # bytes of a Unix socket path, without the terminating NUL
_VNC_BASE_PORT: Final = 5900  # QEMU's -vnc takes a display number, port = 5900 + display
_STDERR_TAIL: Final = 4000  # characters of QEMU's stderr quoted in an error message
_POLL_INTERVAL: Final = 0.05  # seconds between checks of a condition we wait for
_QMP_LINE_LIMIT: Final = 16 * 1024 * 1024  # query-qmp-schema alone is ~200 KB on one line
_QUIT_TIMEOUT: Final = 5.0  # how long a polite QMP quit may take before we terminate


class GuestError(ResourcedError):
    """The demo guest could not be started, driven or stopped."""


@dataclass
class GuestConfig:
    """How to run one demo guest. Each guest needs its own `workdir`."""

    workdir: Path
    """Holds the guest's image copy, its log and its sockets; created if missing."""
    banner: bytes = DEFAULT_BANNER
    tone_hz: int = 440
    audio: bool = True
    """PC speaker into a `none` audiodev that VNC clients can capture."""
    vnc_password: bool = False
    """VNC auth on (`password=on`); set the password with `QemuGuest.set_vnc_password`."""
    tls_dir: Path | None = None
    """QEMU server-side x509 directory (ca-cert.pem, server-cert.pem, server-key.pem)."""
    tls_verify_client: bool = False
    """With `tls_dir`: require a client certificate signed by the CA."""
    tls_anonymous: bool = False
    """Anonymous-DH TLS (VeNCrypt TLSNone/TLSVnc) when no `tls_dir` is given."""
    vnc_tcp_port: int | None = None
    """Listen for VNC on 127.0.0.1:port (5900 or above) instead of the Unix socket."""
    vnc_power_control: bool = False
    """Let VNC clients shut down and reset the guest (`power-control=on`: xvp)."""
    start_paused: bool = False
    """Start with -S: the guest runs only after `resume()`. Lets a serial client
    connect before the banner is written (QEMU drops serial output nobody reads)."""
    extra_args: Sequence[str] = ()
    qemu_binary: str = QEMU_BINARY

    def __post_init__(self) -> None:
        # Build once to validate tone and banner now rather than at start().
        build_boot_sector(self.banner, self.tone_hz)
        if self.vnc_tcp_port is not None and not _VNC_BASE_PORT <= self.vnc_tcp_port <= 65535:
            raise ValueError(
                f"vnc_tcp_port must be between {_VNC_BASE_PORT} and 65535"
                f" (QEMU counts displays from {_VNC_BASE_PORT}), not {self.vnc_tcp_port}"
            )
        if self.tls_verify_client and self.tls_dir is None:
            raise ValueError("tls_verify_client needs tls_dir")


class QemuGuest:
    """One QEMU process running the demo guest; an async context manager.

    `start()` returns once QMP answers and the sockets exist; `stop()` always
    reaps the process and may be called any number of times.
    """

    qmp_timeout: float = 30.0
    """Seconds a QMP command may take. Generous: TCG on a loaded host is slow."""

    def __init__(self, config: GuestConfig) -> None:
        self._config = config
        self._workdir = Path(os.path.abspath(config.workdir))
        self._process: asyncio.subprocess.Process | None = None
        self._started = False
        self._stop_lock = asyncio.Lock()
        self._qmp_writer: asyncio.StreamWriter | None = None
        self._qmp_reader_task: asyncio.Task[None] | None = None
        self._qmp_pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._qmp_ids = itertools.count(1)
        self._qmp_lost = False  # the QMP connection ended (QEMU exited or dropped it)
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        """The latest QMP events QEMU sent (e.g. VNC_CONNECTED), oldest first."""
        self._check_paths()

    # -- paths ---------------------------------------------------------------

    @property
    def config(self) -> GuestConfig:
        return self._config

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def image_path(self) -> Path:
        return self._workdir / "boot.img"

    @property
    def log_path(self) -> Path:
        """QEMU's stdout and stderr."""
        return self._workdir / "qemu.log"

    @property
    def vnc_path(self) -> Path:
        """The VNC Unix socket (not created when `config.vnc_tcp_port` is set)."""
        return self._workdir / "vnc.sock"

    @property
    def serial_path(self) -> Path:
        return self._workdir / "ser.sock"

    @property
    def monitor_path(self) -> Path:
        return self._workdir / "mon.sock"

    @property
    def qmp_path(self) -> Path:
        return self._workdir / "qmp.sock"

    def _socket_paths(self) -> list[Path]:
        paths = [self.serial_path, self.monitor_path, self.qmp_path]
        if self._config.vnc_tcp_port is None:
            paths.append(self.vnc_path)
        return paths

    def _check_paths(self) -> None:
        for path in self._socket_paths():
            size = len(os.fsencode(path))
            if size > _SUN_PATH_MAX:
                raise GuestError(
                    f"work directory {self._workdir} is too deep: socket path {path} is"
                    f" {size} bytes, Unix sockets allow {_SUN_PATH_MAX}; use a shorter"
                    " directory such as one from tempfile.mkdtemp(dir='/tmp')"
                )
        # QEMU's option syntax splits on commas (an escaped one is ",,", which
        # not every option parser honours): refuse rather than guess.
        paths = [self._workdir]
        if self._config.tls_dir is not None:
            paths.append(Path(os.path.abspath(self._config.tls_dir)))
        for path in paths:
            if "," in str(path):
                raise GuestError(f"QEMU cannot be given a path containing a comma: {path}")

    # -- command line ----------------------------------------------------------

    def command(self, binary: str | None = None) -> list[str]:
        """The QEMU command line this guest runs."""
        config = self._config
        machine = "pc,pcspk-audiodev=snd0" if config.audio else "pc"
        if config.vnc_tcp_port is None:
            vnc = f"unix:{self.vnc_path}"
        else:
            vnc = f"127.0.0.1:{config.vnc_tcp_port - _VNC_BASE_PORT}"
        if config.audio:
            vnc += ",audiodev=snd0"
        if config.vnc_password:
            vnc += ",password=on"
        if config.vnc_power_control:
            vnc += ",power-control=on"
        args = [binary or config.qemu_binary, "-accel", "tcg", "-display", "none", "-nodefaults"]
        args += ["-machine", machine]
        if config.audio:
            args += ["-audiodev", "none,id=snd0"]
        if config.tls_dir is not None:
            verify = "on" if config.tls_verify_client else "off"
            tls_dir = os.path.abspath(config.tls_dir)
            args += [
                "-object",
                f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer={verify}",
            ]
            vnc += ",tls-creds=tls0"
        elif config.tls_anonymous:
            args += ["-object", "tls-creds-anon,id=tls0,endpoint=server"]
            vnc += ",tls-creds=tls0"
        args += ["-vga", "std", "-vnc", vnc]
        args += ["-serial", f"unix:{self.serial_path},server=on,wait=off"]
        args += ["-monitor", f"unix:{self.monitor_path},server=on,wait=off"]
        args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        args += ["-drive", f"file={self.image_path},format=raw,if=floppy"]
        if config.start_paused:
            args.append("-S")
        args += list(config.extra_args)
        return args

    # -- process state -----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited and been reaped, else None."""
        return None if self._process is None else self._process.returncode

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def stderr_text(self) -> str:
        """What QEMU has written to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _with_stderr(self, message: str) -> str:
        text = self.stderr_text().strip()
        if not text:
            return f"{message} (QEMU wrote nothing to stderr)"
        if len(text) > _STDERR_TAIL:
            text = "..." + text[-_STDERR_TAIL:]
        return f"{message}; QEMU's stderr:\n{text}"

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, timeout: float = 60.0) -> None:
        """Launch QEMU; return once QMP answers and the sockets exist.

        Raises GuestError if QEMU is missing, exits early (with its stderr in
        the message) or is not ready within `timeout` seconds.
        """
        if self._started:
            raise GuestError("a QemuGuest can be started only once")
        self._started = True
        binary = shutil.which(self._config.qemu_binary)
        if binary is None:
            raise GuestError(
                f"{self._config.qemu_binary} not found: install the Debian package qemu-system-x86"
            )
        image = build_boot_sector(self._config.banner, self._config.tone_hz)
        self._workdir.mkdir(parents=True, exist_ok=True)
        # QEMU unlinks a stale socket itself, but our readiness check looks for
        # the socket files: a leftover one must not pass for the new QEMU's.
        for path in self._socket_paths():
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
        # Each guest its own image copy: QEMU write-locks the image.
        self.image_path.write_bytes(image)
        # A log file rather than a pipe: nothing has to drain it, and it is
        # still there to read after QEMU died.
        # QEMU stays in our process group on purpose, so a terminal's Ctrl-C
        # or a killed process group also ends it; stop() copes with that.
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(binary),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._workdir,
            )
        try:
            await self._wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        process = self._process
        assert process is not None
        while True:
            if process.returncode is not None:
                raise GuestError(
                    self._with_stderr(f"QEMU exited with status {process.returncode} at start")
                )
            if self._qmp_writer is None and self.qmp_path.is_socket():
                # A refused or stalled connection only means "not yet".
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
                    await self._connect_qmp(max(0.1, deadline - loop.time()))
            if self._qmp_writer is not None and all(p.is_socket() for p in self._socket_paths()):
                return
            if loop.time() >= deadline:
                raise GuestError(self._with_stderr(f"QEMU was not ready within {timeout:g} s"))
            await asyncio.sleep(_POLL_INTERVAL)

    async def stop(self, timeout: float = 20.0) -> None:
        """Quit QEMU (QMP quit, then SIGTERM, then SIGKILL) and reap it. Idempotent."""
        async with self._stop_lock:
            process = self._process
            try:
                if process is not None and process.returncode is None:
                    await self._stop_process(process, timeout)
            finally:
                # Whatever happened above (even cancellation), leave no QEMU
                # behind and no half-closed QMP connection.
                if process is not None and process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
                await self._close_qmp()

    async def _stop_process(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        if self._qmp_writer is not None:
            # QEMU may close the connection before its answer reaches us.
            with contextlib.suppress(GuestError, TimeoutError):
                async with asyncio.timeout(_QUIT_TIMEOUT):
                    await self.qmp("quit")
        try:
            async with asyncio.timeout(timeout):
                await process.wait()
            return
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_QUIT_TIMEOUT):
                await process.wait()

    async def wait(self) -> int:
        """Wait until QEMU exits, for whatever reason; return its exit status."""
        if self._process is None:
            raise GuestError("the guest was never started")
        return await self._process.wait()

    # -- QMP -------------------------------------------------------------------

    async def _connect_qmp(self, timeout: float) -> None:
        reader, writer = await asyncio.open_unix_connection(self.qmp_path, limit=_QMP_LINE_LIMIT)
        try:
            async with asyncio.timeout(timeout):
                greeting = json.loads(await reader.readline() or b"null")
                if not isinstance(greeting, dict) or "QMP" not in greeting:
                    raise GuestError(f"unexpected QMP greeting: {greeting!r}")
                writer.write(b'{"execute": "qmp_capabilities"}\n')
                await writer.drain()
                # QEMU sends no events before capabilities are negotiated, so
                # the next line is the answer.
                answer = json.loads(await reader.readline() or b"null")
                if not isinstance(answer, dict) or "return" not in answer:
                    raise GuestError(f"QMP capabilities negotiation failed: {answer!r}")
        except BaseException:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            raise
        self._qmp_writer = writer
        self._qmp_reader_task = asyncio.create_task(self._read_qmp(reader))

    async def _read_qmp(self, reader: asyncio.StreamReader) -> None:
        """Route QMP answers to their waiting commands and keep events."""
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if "event" in message:
                    self.events.append(message)
                    continue
                future = self._qmp_pending.pop(str(message.get("id")), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (OSError, ValueError):
            pass  # QEMU went away mid-line or sent garbage: same as EOF for us
        finally:
            # Later commands must fail at once rather than wait for an answer
            # that cannot come.
            self._qmp_lost = True
            for future in self._qmp_pending.values():
                if not future.done():
                    future.set_exception(EOFError("QMP connection closed"))
            self._qmp_pending.clear()

    async def _close_qmp(self) -> None:
        task, self._qmp_reader_task = self._qmp_reader_task, None
        writer, self._qmp_writer = self._qmp_writer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def qmp(self, command: str, /, **arguments: Any) -> Any:
        """Run a QMP command and return its "return" value.

        Argument names go to QEMU as given; pass hyphenated ones with
        `**{"some-name": value}`. Raises GuestError with QEMU's error class
        and description if the command fails, or if QEMU is gone.
        """
        writer = self._qmp_writer
        if writer is None or writer.is_closing() or self._qmp_lost:
            raise GuestError(self._with_stderr(f"QMP {command}: QEMU is not running"))
        request_id = str(next(self._qmp_ids))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._qmp_pending[request_id] = future
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(self.qmp_timeout):
                answer = await future
        except (OSError, EOFError) as error:
            raise GuestError(
                self._with_stderr(f"QMP {command}: connection to QEMU lost ({error})")
            ) from error
        except TimeoutError as error:
            raise GuestError(f"QMP {command}: no answer within {self.qmp_timeout:g} s") from error
        finally:
            self._qmp_pending.pop(request_id, None)
        if "error" in answer:
            error_info = answer["error"]
            raise GuestError(
                f"QMP {command} failed: {error_info.get('class')}: {error_info.get('desc')}"
            )
        return answer.get("return")

    async def status(self) -> str:
        """QEMU's run state: "running", "paused", "prelaunch", ..."""
        result = await self.qmp("query-status")
        return str(result["status"])

    async def pause(self) -> None:
        await self.qmp("stop")

    async def resume(self) -> None:
        await self.qmp("cont")

    async def set_vnc_password(self, password: str) -> None:
        """Set the VNC password (QEMU uses at most its first 8 bytes, as VNC auth does).

        Needs `config.vnc_password`; otherwise QEMU refuses with GuestError.
        """
        # change-vnc-password is the VNC-only command; set_password with
        # protocol=vnc does the same in 7.2.
        await self.qmp("change-vnc-password", password=password)

    # -- client connections ------------------------------------------------------

    async def open_vnc(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw connection to the VNC server (Unix socket or TCP, as configured)."""
        port = self._config.vnc_tcp_port
        if port is None:
            return await asyncio.open_unix_connection(self.vnc_path)
        return await asyncio.open_connection("127.0.0.1", port)

    async def open_serial(
        self, timeout: float = 30.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the serial console; return once QEMU has accepted the connection.

        Waiting for QEMU's side matters: output written before QEMU accepts
        the connection is dropped, and the kernel completes a Unix connect
        before QEMU's main loop gets round to accepting it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reader, writer = await asyncio.open_unix_connection(self.serial_path)
        try:
            # QEMU signals the connection nowhere but in query-chardev: poll it.
            while not await self._serial_connected():
                if loop.time() >= deadline:
                    raise GuestError(
                        f"QEMU did not accept the serial connection within {timeout:g} s"
                        " (is another client connected?)"
                    )
                await asyncio.sleep(_POLL_INTERVAL)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _serial_connected(self) -> bool:
        return await self.chardev_connected("serial0")

    async def chardev_connected(self, label: str) -> bool:
        """Whether QEMU has accepted a client on its server chardev `label`
        (`serial0`, `compat_monitor0` for -monitor)."""
        # QEMU reports a server chardev without a client as "disconnected:...".
        for chardev in await self.qmp("query-chardev"):
            if chardev.get("label") == label:
                return not str(chardev.get("filename", "")).startswith("disconnected:")
        raise GuestError(f"QEMU has no {label} chardev")

    async def wait_chardev_connected(self, label: str, timeout: float = 30.0) -> None:
        """Wait until something (e.g. the gateway) is attached to chardev `label`."""
        try:
            async with asyncio.timeout(timeout):
                # QEMU tells of its chardevs only when asked: poll QMP.
                while True:
                    if await self.chardev_connected(label):
                        return
                    await asyncio.sleep(_POLL_INTERVAL)
        except TimeoutError:
            raise GuestError(f"nothing attached to chardev {label} within {timeout:g} s") from None
