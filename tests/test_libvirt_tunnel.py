"""Where a remote libvirt guest's VNC server is reached (`resourced.libvirt.tunnel`),
pure: the route for each kind of listen address, and the ssh command built from
the URI as libvirt's ssh transport builds its own. The tunnel itself runs
against a real sshd in tests/dbus/test_libvirt_remote.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from resourced.errors import NotConnected
from resourced.libvirt.follow import _connect_vnc, is_local
from resourced.libvirt.tunnel import VncRoute, ssh_forward_argv, vnc_route

SSH_URI = "qemu+ssh://root@virthost:2222/system?keyfile=/k/id&no_verify=1&command=/opt/ssh"


def test_ssh_uri_parameters_become_ssh_options() -> None:
    assert ssh_forward_argv(SSH_URI, "127.0.0.1", 5901) == [
        "/opt/ssh",
        *("-p", "2222", "-l", "root", "-i", "/k/id"),
        *("-o", "StrictHostKeyChecking=no"),
        *("-T", "-e", "none", "-W", "127.0.0.1:5901", "--", "virthost"),
    ]


def test_plain_ssh_uri() -> None:
    assert ssh_forward_argv("qemu+ssh://virthost/system", "::1", 5900) == [
        *("ssh", "-T", "-e", "none", "-W", "[::1]:5900", "--", "virthost"),
    ]


def test_libssh_transports_use_ssh_with_their_known_hosts() -> None:
    uri = "qemu+libssh2://me%40corp@virthost/system?known_hosts=/kh&known_hosts_verify=ignore"
    assert ssh_forward_argv(uri, "localhost", 5900) == [
        *("ssh", "-l", "me@corp"),
        *("-o", "UserKnownHostsFile=/kh", "-o", "StrictHostKeyChecking=no"),
        *("-T", "-e", "none", "-W", "localhost:5900", "--", "virthost"),
    ]
    # `command` is the ssh transport's alone (libssh has its own client).
    assert ssh_forward_argv("qemu+libssh://h/system?command=/x", "127.0.0.1", 1)[0] == "ssh"


@pytest.mark.parametrize("uri", ["qemu+tls://virthost/system", "qemu+tcp://virthost/system"])
def test_no_ssh_no_tunnel(uri: str) -> None:
    assert ssh_forward_argv(uri, "127.0.0.1", 5900) is None
    with pytest.raises(NotConnected, match=r"listens on 127\.0\.0\.1 of virthost only"):
        vnc_route(uri, "127.0.0.1", 5900)


@pytest.mark.parametrize(
    ("listen", "route"),
    [
        (None, "virthost::5900"),
        ("0.0.0.0", "virthost::5900"),
        ("::", "virthost::5900"),
        ("192.0.2.7", "192.0.2.7::5900"),
        ("127.0.0.1", "127.0.0.1::5900 through ssh to virthost"),
        ("::1", "[::1]::5900 through ssh to virthost"),
        ("localhost", "localhost::5900 through ssh to virthost"),
    ],
)
def test_route_by_listen_address(listen: str | None, route: str) -> None:
    found = vnc_route("qemu+ssh://virthost/system", listen, 5900)
    assert isinstance(found, VncRoute)
    assert str(found) == route
    assert bool(found.ssh) == ("through ssh" in route)


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("qemu:///system", True),
        ("qemu:///session", True),
        ("qemu+unix:///system", True),
        ("qemu+unix:///system?socket=/run/libvirt/libvirt-sock", True),
        ("qemu+ssh://virthost/system", False),
        ("qemu+ssh://root@127.0.0.1:2222/system", False),
        ("qemu+tls://virthost/system", False),
        ("qemu://virthost/system", False),
    ],
)
def test_local_uris_use_open_graphics_fd(uri: str, local: bool) -> None:
    assert is_local(uri) is local


def _fake_ssh(directory: Path, script: str) -> tuple[str, ...]:
    """A stand-in for ssh that fails the way we want (the real one is tested
    against a real sshd in tests/dbus/test_libvirt_remote.py)."""
    path = directory / "ssh"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return (str(path), "-W", "127.0.0.1:5900", "--", "virthost")


async def test_ssh_that_cannot_forward_is_named(tmp_path: Path) -> None:
    argv = _fake_ssh(
        tmp_path, "echo 'channel 0: open failed: administratively prohibited' >&2\nexit 255\n"
    )
    with pytest.raises(NotConnected, match=r"could not forward.*exit 255.*prohibited"):
        await _connect_vnc(VncRoute("127.0.0.1", 5900, argv), None, [])


async def test_server_that_is_not_vnc_behind_ssh(tmp_path: Path) -> None:
    argv = _fake_ssh(tmp_path, "printf 'SSH-2.0-OpenSSH_9.2\\r\\n'\n")
    with pytest.raises(NotConnected, match=r"\(through ssh to virthost\)$"):
        await _connect_vnc(VncRoute("127.0.0.1", 5900, argv), None, [])


async def test_no_ssh_binary(tmp_path: Path) -> None:
    argv = (str(tmp_path / "no-ssh"), "--", "virthost")
    with pytest.raises(NotConnected, match="cannot run"):
        await _connect_vnc(VncRoute("127.0.0.1", 5900, argv), None, [])
