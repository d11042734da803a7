"""A private OpenSSH server on localhost, so that a `qemu+ssh://` URI reaches the
machine's own libvirtd the way it reaches a remote host.

`private_sshd(directory)` starts Debian's `/usr/sbin/sshd` in the foreground
with everything of its own in `directory`: its config (`ListenAddress
127.0.0.1`, a free port, public keys only), a fresh host key, and an
`authorized_keys` holding a fresh client key for the user the tests run as.
It never reads or writes the machine's ssh configuration (/etc/ssh, ~/.ssh);
the one thing it may create outside `directory` is /run/sshd, the empty
directory Debian's sshd insists on for privilege separation (its init script
makes it at boot; nothing is started here that would).

The client side is just as private. libvirt's ssh transport runs `ssh -p PORT
-l USER -i KEYFILE -T -e none ... -- HOST 'sh -c ...virt-ssh-helper...'`, and
OpenSSH reads ~/.ssh/config and writes ~/.ssh/known_hosts of the user's passwd
entry (not $HOME); libvirt's `known_hosts` parameter is for its libssh
transports only, and `no_verify=1` makes ssh add the key to ~/.ssh/known_hosts.
So the URI names a wrapper as its `command`: `ssh -F` with a config of our own
whose known_hosts file already holds the server's host key, checked strictly.
On the far side the command finds `virt-ssh-helper` (Debian libvirt-daemon)
on sshd's default PATH, which speaks to libvirtd's socket. The server allows
stdio forwarding (`ssh -W`, how the service reaches a guest's VNC server that
listens on the host's loopback) to 127.0.0.1 only, and logs each one.

Teardown terminates the server and the session processes it forked (each
session is its own process group, so they are found by parent pid before the
listener goes). A missing sshd fails the test: nothing here skips.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SSHD = "/usr/sbin/sshd"
#: How long sshd gets to listen, and its sessions to end at teardown.
TIMEOUT = 60.0
#: Ports tried before giving up (another process may take a free port first).
ATTEMPTS = 5
PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class PrivateSshd:
    """A running private sshd on 127.0.0.1 and what a client needs to use it."""

    directory: Path
    port: int
    #: The listener's process id (its sessions are its children).
    pid: int
    user: str
    client_key: Path
    #: `ssh` with our own client config (known_hosts, no ~/.ssh): libvirt's `command`.
    ssh_command: Path
    log: Path

    def libvirt_uri(self, path: str = "/system") -> str:
        """`qemu+ssh://USER@127.0.0.1:PORT/system?keyfile=...&command=...`."""
        query = f"keyfile={quote(str(self.client_key))}&command={quote(str(self.ssh_command))}"
        return f"qemu+ssh://{self.user}@127.0.0.1:{self.port}{path}?{query}"

    def sessions_accepted(self) -> int:
        """How many logins sshd accepted (its log says so once per session)."""
        return self.log.read_text(errors="replace").count("Accepted publickey for")

    def cut_sessions(self) -> int:
        """End every session (as a network cut would; the listener stays): how many
        processes were ended."""
        sessions = _descendants(self.pid)
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not _wait_gone(sessions, TIMEOUT), "sshd sessions did not end"
        return len(sessions)

    def forwardings_to(self, host: str, port: int) -> int:
        """How many `ssh -W` (direct-tcpip) channels were asked for to host:port."""
        return self.log.read_text(errors="replace").count(f"target {host} port {port}\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _keygen(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair at `path`; the public key's line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    return path.with_suffix(".pub").read_text().strip()


def _server_config(directory: Path, port: int, user: str) -> str:
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {directory / "host_key"}
PidFile none
AuthorizedKeysFile {directory / "authorized_keys"}
AllowUsers {user}
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The key files live under /tmp (world-writable), which strict modes refuse.
StrictModes no
X11Forwarding no
# The VNC connection to a guest that listens on loopback goes through `ssh -W`,
# to 127.0.0.1 only; DEBUG1 logs each forwarding's target.
AllowTcpForwarding local
PermitOpen 127.0.0.1:*
LogLevel DEBUG1
AllowAgentForwarding no
PermitTTY no
PrintMotd no
UseDNS no
"""


def _client_config(directory: Path) -> str:
    return f"""\
Host *
    UserKnownHostsFile {directory / "known_hosts"}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    CheckHostIP no
    BatchMode yes
    IdentitiesOnly yes
    IdentityAgent none
    ConnectTimeout 30
"""


def _children(pid: int) -> list[int]:
    """Every process whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        out.append(child)
        out.extend(_descendants(child))
    return out


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    """The listener and every session it forked (ours alone: found by parentage)."""
    sessions = _descendants(process.pid)
    if process.poll() is None:
        process.terminate()
    for pid in sessions:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pid in _wait_gone(sessions, TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start(directory: Path, port: int, user: str) -> subprocess.Popen[bytes] | None:
    """sshd on `port`, once it listens; None if the port was taken meanwhile."""
    config = directory / "sshd_config"
    config.write_text(_server_config(directory, port, user))
    log = directory / "sshd.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + TIMEOUT
    listening = f"Server listening on 127.0.0.1 port {port}"
    while listening not in log.read_text(errors="replace"):
        if process.poll() is not None:
            said = log.read_text(errors="replace")
            if "Address already in use" in said:
                return None
            raise AssertionError(f"sshd exited with {process.returncode}:\n{said}")
        if time.monotonic() > deadline:
            _stop(process)
            raise AssertionError(f"sshd did not listen within {TIMEOUT:.0f} s:\n{log.read_text()}")
        time.sleep(0.05)
    return process


@contextlib.contextmanager
def private_sshd(directory: Path) -> Iterator[PrivateSshd]:
    """A private sshd for the current user, files in `directory` (module docstring)."""
    assert shutil.which("ssh") is not None, "ssh is not installed (Debian openssh-client)"
    assert Path(SSHD).exists(), f"{SSHD} is not installed (Debian openssh-server)"
    assert shutil.which("virt-ssh-helper") is not None, (
        "virt-ssh-helper is not installed (Debian libvirt-daemon): the far side needs it"
    )
    user = pwd.getpwuid(os.getuid()).pw_name
    directory.mkdir(parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    host_key = _keygen(directory / "host_key", "resourced test sshd")
    client_key = directory / "client_key"
    (directory / "authorized_keys").write_text(_keygen(client_key, "resourced test") + "\n")
    client_config = directory / "ssh_config"
    client_config.write_text(_client_config(directory))
    ssh_command = directory / "ssh"
    ssh_command.write_text(f'#!/bin/sh\nexec ssh -F "{client_config}" "$@"\n')
    ssh_command.chmod(0o755)

    process = None
    for _ in range(ATTEMPTS):
        port = _free_port()
        process = _start(directory, port, user)
        if process is not None:
            break
    assert process is not None, f"sshd found no free port in {ATTEMPTS} attempts"
    host_type, host_blob = host_key.split()[:2]
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_type} {host_blob}\n")
    try:
        # One login first, so that a machine where it cannot work (a locked
        # account, a missing shell) fails here with both sides' words.
        probe = subprocess.run(
            [
                *(str(ssh_command), "-p", str(port), "-l", user, "-i", str(client_key)),
                *("-T", "127.0.0.1", "true"),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert probe.returncode == 0, (
            f"cannot log in to the private sshd as {user}: {probe.stderr.strip()}\n"
            f"--- sshd log ---\n{(directory / 'sshd.log').read_text(errors='replace')}"
        )
        yield PrivateSshd(
            directory, port, process.pid, user, client_key, ssh_command, directory / "sshd.log"
        )
    finally:
        _stop(process)
