"""VNC addresses as viewers write them (`resourced.rfb.aio.parse_address`)."""

from __future__ import annotations

import pytest

from resourced.errors import ConfigurationError
from resourced.rfb.aio import Address, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Unix sockets
        ("unix:/run/vm/vnc.sock", Address("unix", path="/run/vm/vnc.sock")),
        ("unix:relative.sock", Address("unix", path="relative.sock")),
        ("/var/lib/libvirt/qemu/vnc.sock", Address("unix", path="/var/lib/libvirt/qemu/vnc.sock")),
        # An inherited, connected file descriptor
        ("fd:3", Address("fd", fd=3)),
        ("fd:0", Address("fd", fd=0)),
        # host:display is port 5900 + display
        ("host:0", Address("tcp", host="host", port=5900)),
        ("host:1", Address("tcp", host="host", port=5901)),
        ("example.org:99", Address("tcp", host="example.org", port=5999)),
        # ...but a "display" of 100 or more is a port (TigerVNC)
        ("host:5901", Address("tcp", host="host", port=5901)),
        ("host:100", Address("tcp", host="host", port=100)),
        # host::port is always a port
        ("host::5900", Address("tcp", host="host", port=5900)),
        ("host::1", Address("tcp", host="host", port=1)),
        ("127.0.0.1::65535", Address("tcp", host="127.0.0.1", port=65535)),
        # an empty host is localhost
        (":1", Address("tcp", host="localhost", port=5901)),
        ("::5902", Address("tcp", host="localhost", port=5902)),
        # IPv6 literals in brackets
        ("[::1]::5900", Address("tcp", host="::1", port=5900)),
        ("[::1]:2", Address("tcp", host="::1", port=5902)),
        ("[fe80::1%eth0]::5900", Address("tcp", host="fe80::1%eth0", port=5900)),
        # vnc:// URIs carry a port
        ("vnc://host:5901", Address("tcp", host="host", port=5901)),
        ("vnc://host:1", Address("tcp", host="host", port=1)),
        ("vnc://host:5901/", Address("tcp", host="host", port=5901)),
        ("vnc://host", Address("tcp", host="host", port=5900)),
        ("vnc://[::1]:5905", Address("tcp", host="::1", port=5905)),
        ("vnc://[::1]", Address("tcp", host="::1", port=5900)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        "host:",
        "host::",
        "host:abc",
        "host::x1",
        "host:1:2",
        "host::0",
        "host::65536",
        "host::99999",
        "host:65536",
        "::1::5900",  # an IPv6 literal needs brackets
        "[::1",
        "fd:",
        "fd:three",
        "fd:3.0",
        "vnc://host:99999",
        "vnc://host:0",
        # Bad ports must not end up in the host name, nor be replaced by 5900.
        "vnc://host:abc",
        # Not a file descriptor.
        "fd:-1",
        # A Unix socket needs a path.
        "unix:",
    ],
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_address(text)


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot parse VNC address"):
        parse_address("no port here")


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("tcp", host="host", port=5901), "host::5901"),
        (Address("tcp", host="::1", port=5900), "[::1]::5900"),
        (Address("unix", path="/run/x.sock"), "unix:/run/x.sock"),
        (Address("fd", fd=4), "fd:4"),
    ],
)
def test_address_str_parses_back(address: Address, text: str) -> None:
    assert str(address) == text
    assert parse_address(text) == address
