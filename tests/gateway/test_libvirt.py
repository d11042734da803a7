"""resourced.gateway.libvirt: domain XML to consoles and VNC target; lookups via the test driver.

The XML samples are trimmed from what libvirt 9.0 + QEMU 7.2 really wrote on this
kind of machine (live and inactive), plus hand-written edge cases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from resourced.consoles import MAX_CONSOLE_NAME, ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.errors import ResourcedError
from resourced.gateway.libvirt import (
    MAX_DOMAIN_XML_LENGTH,
    DomainResources,
    LibvirtError,
    NoSuchGuest,
    VncTarget,
    lookup_domain,
    parse_domain_xml,
)

UUID = "68d49aed-8a39-4d10-9bbb-03309c97cfea"


def unix(path: str) -> Endpoint:
    return Endpoint(EndpointType.UNIX, path)


def pty(path: str) -> Endpoint:
    return Endpoint(EndpointType.PTY, path)


def domain(devices: str, name: str = "guest", uuid: str = UUID) -> str:
    return (
        f"<domain type='qemu' id='3'><name>{name}</name><uuid>{uuid}</uuid>"
        f"<memory unit='KiB'>16384</memory><devices>{devices}</devices></domain>"
    )


def consoles_of(devices: str) -> tuple[ConsoleSpec, ...]:
    return parse_domain_xml(domain(devices)).consoles


def vnc_of(devices: str) -> VncTarget | None:
    return parse_domain_xml(domain(devices)).vnc


# Live XML of a running TCG domain: unix serial, pty serial, the <console> libvirt
# adds for serial0, and VNC on a Unix socket with a password (XML_SECURE).
LIVE_UNIX_SERIAL = """\
<domain type='qemu' id='1'>
  <name>rsd-proto</name>
  <uuid>68d49aed-8a39-4d10-9bbb-03309c97cfea</uuid>
  <memory unit='KiB'>16384</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='fd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='floppy'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/rsdgw/boot.img' index='1'/>
      <target dev='fda' bus='fdc'/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='/tmp/rsdgw/ser.sock'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <serial type='pty'>
      <source path='/dev/pts/0'/>
      <target type='isa-serial' port='1'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial1'/>
    </serial>
    <console type='unix'>
      <source mode='bind' path='/tmp/rsdgw/ser.sock'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-1-rsd-proto/vnc.sock' passwd='sekrit'>
      <listen type='socket' socket='/var/lib/libvirt/qemu/domain-1-rsd-proto/vnc.sock'/>
    </graphics>
    <audio id='1' type='none'/>
    <video><model type='vga' vram='16384' heads='1' primary='yes'/></video>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+0:+0</label></seclabel>
</domain>
"""

# The same persistent domain inactive and then running: pty serial (+ its console),
# virtio console, unix parallel, guest agent channel, qemu-vdagent, VNC on TCP.
INACTIVE_MIXED = """\
<domain type='qemu'>
  <name>rsd-proto2</name>
  <uuid>61d91a9d-80f3-4622-8f0e-f8ea55d4861c</uuid>
  <devices>
    <serial type='pty'>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
    </serial>
    <parallel type='unix'>
      <source mode='bind' path='/tmp/rsdgw/par.sock'/>
      <target port='0'/>
    </parallel>
    <console type='pty'><target type='serial' port='0'/></console>
    <console type='pty'><target type='virtio' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='qemu-vdagent'>
      <target type='virtio' name='com.redhat.spice.0'/>
    </channel>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
</domain>
"""

LIVE_MIXED = """\
<domain type='qemu' id='2'>
  <name>rsd-proto2</name>
  <uuid>61d91a9d-80f3-4622-8f0e-f8ea55d4861c</uuid>
  <devices>
    <serial type='pty'>
      <source path='/dev/pts/0'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
      <alias name='serial0'/>
    </serial>
    <parallel type='unix'>
      <source mode='bind' path='/tmp/rsdgw/par.sock'/>
      <target port='0'/>
      <alias name='parallel0'/>
    </parallel>
    <console type='pty' tty='/dev/pts/0'>
      <source path='/dev/pts/0'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <console type='pty' tty='/dev/pts/1'>
      <source path='/dev/pts/1'/>
      <target type='virtio' port='0'/>
      <alias name='console1'/>
    </console>
    <channel type='unix'>
      <source mode='bind'
              path='/var/lib/libvirt/qemu/channel/target/domain-2-rsd-proto2/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
      <alias name='channel0'/>
    </channel>
    <channel type='qemu-vdagent'>
      <target type='virtio' name='com.redhat.spice.0' state='disconnected'/>
    </channel>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.1'/>
    </channel>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
</domain>
"""

AGENT_SOCKET = "/var/lib/libvirt/qemu/channel/target/domain-2-rsd-proto2/org.qemu.guest_agent.0"


# --- parse_domain_xml: realistic documents -------------------------------------------


def test_live_unix_and_pty_serials_with_vnc_socket_and_password() -> None:
    resources = parse_domain_xml(LIVE_UNIX_SERIAL)
    assert resources == DomainResources(
        name="rsd-proto",
        uuid=UUID,
        consoles=(
            ConsoleSpec("serial0", ConsoleKind.SERIAL, unix("/tmp/rsdgw/ser.sock")),
            ConsoleSpec("serial1", ConsoleKind.SERIAL, pty("/dev/pts/0")),
        ),
        vnc=VncTarget(
            socket_path="/var/lib/libvirt/qemu/domain-1-rsd-proto/vnc.sock",
            host=None,
            port=None,
            password="sekrit",
        ),
        aliases={"serial0": "serial0", "serial1": "serial1"},  # from <alias> in the live XML
    )


def test_live_mixed_devices() -> None:
    resources = parse_domain_xml(LIVE_MIXED)
    assert resources.name == "rsd-proto2"
    assert resources.uuid == "61d91a9d-80f3-4622-8f0e-f8ea55d4861c"
    assert resources.consoles == (
        ConsoleSpec("serial0", ConsoleKind.SERIAL, pty("/dev/pts/0")),
        ConsoleSpec("parallel0", ConsoleKind.PARALLEL, unix("/tmp/rsdgw/par.sock")),
        ConsoleSpec("console0", ConsoleKind.VIRTIO_CONSOLE, pty("/dev/pts/1")),
        ConsoleSpec("org.qemu.guest_agent.0", ConsoleKind.CHANNEL, unix(AGENT_SOCKET)),
    )
    assert resources.vnc == VncTarget(socket_path=None, host="127.0.0.1", port=5900, password=None)


def test_inactive_domain_has_no_ptys_sockets_or_port_yet() -> None:
    resources = parse_domain_xml(INACTIVE_MIXED)
    # PTYs have no path, the agent channel no source: only the parallel socket is known.
    assert resources.consoles == (
        ConsoleSpec("parallel0", ConsoleKind.PARALLEL, unix("/tmp/rsdgw/par.sock")),
    )
    assert resources.vnc == VncTarget(socket_path=None, host="127.0.0.1", port=None, password=None)


# --- character devices ----------------------------------------------------------------


def test_unix_serial() -> None:
    assert consoles_of(
        "<serial type='unix'><source mode='bind' path='/run/s.sock'/><target port='0'/></serial>"
    ) == (ConsoleSpec("serial0", ConsoleKind.SERIAL, unix("/run/s.sock")),)


def test_pty_serial_takes_its_port_number() -> None:
    assert consoles_of(
        "<serial type='pty'><source path='/dev/pts/7'/><target port='2'/></serial>"
    ) == (ConsoleSpec("serial2", ConsoleKind.SERIAL, pty("/dev/pts/7")),)


def test_pty_without_path_is_skipped() -> None:
    assert consoles_of("<serial type='pty'><target port='0'/></serial>") == ()
    assert consoles_of("<serial type='pty'><source/><target port='0'/></serial>") == ()


def test_console_tty_attribute_is_enough_for_a_pty() -> None:
    assert consoles_of(
        "<console type='pty' tty='/dev/pts/4'><target type='virtio' port='1'/></console>"
    ) == (ConsoleSpec("console1", ConsoleKind.VIRTIO_CONSOLE, pty("/dev/pts/4")),)


def test_serial_console_is_not_duplicated() -> None:
    devices = (
        "<serial type='pty'><source path='/dev/pts/1'/><target port='0'/></serial>"
        "<console type='pty' tty='/dev/pts/1'><source path='/dev/pts/1'/>"
        "<target type='serial' port='0'/></console>"
    )
    assert consoles_of(devices) == (ConsoleSpec("serial0", ConsoleKind.SERIAL, pty("/dev/pts/1")),)


def test_console_without_target_type_is_the_serial_console() -> None:
    devices = (
        "<serial type='pty'><source path='/dev/pts/1'/><target port='0'/></serial>"
        "<console type='pty'><source path='/dev/pts/1'/><target port='0'/></console>"
    )
    assert consoles_of(devices) == (ConsoleSpec("serial0", ConsoleKind.SERIAL, pty("/dev/pts/1")),)


def test_serial_console_without_a_serial_element_still_counts() -> None:
    devices = (
        "<console type='pty'><source path='/dev/pts/3'/><target type='serial' port='0'/></console>"
    )
    assert consoles_of(devices) == (ConsoleSpec("serial0", ConsoleKind.SERIAL, pty("/dev/pts/3")),)


def test_serial_console_on_another_port_is_its_own_device() -> None:
    devices = (
        "<serial type='pty'><source path='/dev/pts/1'/><target port='0'/></serial>"
        "<console type='pty'><source path='/dev/pts/2'/><target type='serial' port='1'/></console>"
    )
    assert consoles_of(devices) == (
        ConsoleSpec("serial0", ConsoleKind.SERIAL, pty("/dev/pts/1")),
        ConsoleSpec("serial1", ConsoleKind.SERIAL, pty("/dev/pts/2")),
    )


def test_virtio_console_on_unix_socket() -> None:
    devices = (
        "<console type='unix'><source mode='bind' path='/run/hvc.sock'/>"
        "<target type='virtio' port='0'/></console>"
    )
    assert consoles_of(devices) == (
        ConsoleSpec("console0", ConsoleKind.VIRTIO_CONSOLE, unix("/run/hvc.sock")),
    )


def test_other_console_targets_are_kind_other() -> None:
    devices = (
        "<console type='pty'><source path='/dev/pts/5'/><target type='sclp' port='0'/></console>"
    )
    assert consoles_of(devices) == (ConsoleSpec("console0", ConsoleKind.OTHER, pty("/dev/pts/5")),)


def test_parallel() -> None:
    devices = (
        "<parallel type='pty'><source path='/dev/pts/9'/><target port='0'/></parallel>"
        "<parallel type='unix'><source mode='bind' path='/run/lp1'/><target port='1'/></parallel>"
    )
    assert consoles_of(devices) == (
        ConsoleSpec("parallel0", ConsoleKind.PARALLEL, pty("/dev/pts/9")),
        ConsoleSpec("parallel1", ConsoleKind.PARALLEL, unix("/run/lp1")),
    )


def test_guest_agent_channel() -> None:
    devices = (
        "<channel type='unix'><source mode='bind' path='/run/ga.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>"
    )
    assert consoles_of(devices) == (
        ConsoleSpec("org.qemu.guest_agent.0", ConsoleKind.CHANNEL, unix("/run/ga.sock")),
    )


def test_channel_names_are_sanitised_and_truncated() -> None:
    long_name = "org.example." + "x" * 100
    devices = (
        "<channel type='unix'><source mode='bind' path='/run/a'/>"
        "<target type='virtio' name='com.example/agent 1\u00e9'/></channel>"
        f"<channel type='unix'><source mode='bind' path='/run/b'/>"
        f"<target type='virtio' name='{long_name}'/></channel>"
        "<channel type='pty'><source path='/dev/pts/2'/><target type='virtio'/></channel>"
    )
    names = [spec.name for spec in consoles_of(devices)]
    assert names == ["com.example_agent_1_", long_name[:MAX_CONSOLE_NAME], "channel2"]
    assert all(spec.kind is ConsoleKind.CHANNEL for spec in consoles_of(devices))


def test_names_are_made_unique() -> None:
    long_name = "n" * 80
    devices = (
        "<serial type='pty'><source path='/dev/pts/1'/><target port='0'/></serial>"
        "<serial type='pty'><source path='/dev/pts/2'/><target port='0'/></serial>"
        "<channel type='unix'><source mode='bind' path='/run/c1'/>"
        "<target type='virtio' name='serial0'/></channel>"
        f"<channel type='unix'><source mode='bind' path='/run/c2'/>"
        f"<target type='virtio' name='{long_name}'/></channel>"
        f"<channel type='unix'><source mode='bind' path='/run/c3'/>"
        f"<target type='virtio' name='{long_name}'/></channel>"
    )
    names = [spec.name for spec in consoles_of(devices)]
    assert names == [
        "serial0",
        "serial0-2",
        "serial0-3",
        "n" * MAX_CONSOLE_NAME,
        "n" * (MAX_CONSOLE_NAME - 2) + "-2",
    ]


def test_missing_port_falls_back_to_the_device_index() -> None:
    devices = (
        "<serial type='pty'><source path='/dev/pts/1'/></serial>"
        "<serial type='pty'><source path='/dev/pts/2'/><target port='bogus'/></serial>"
    )
    assert [spec.name for spec in consoles_of(devices)] == ["serial0", "serial1"]


@pytest.mark.parametrize(
    "device",
    [
        # QEMU is the client here: nothing listens for us.
        "<serial type='unix'><source mode='connect' path='/run/s'/><target port='0'/></serial>",
        "<serial type='unix'><source path='/run/s'/><target port='0'/></serial>",
        "<serial type='unix'><source mode='bind'/><target port='0'/></serial>",
        "<serial type='unix'><target port='0'/></serial>",
        "<serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/>"
        "<protocol type='raw'/><target port='0'/></serial>",
        "<serial type='file'><source path='/var/log/s.log'/><target port='0'/></serial>",
        "<serial type='null'><target port='0'/></serial>",
        "<serial><target port='0'/></serial>",
        "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>",
        "<channel type='qemu-vdagent'><target type='virtio' name='com.redhat.spice.0'/></channel>",
        "<channel type='unix'><source mode='bind' path='/run/fwd'/>"
        "<target type='guestfwd' address='10.0.2.1' port='4600'/></channel>",
        "<channel type='unix'><source mode='bind' path='/run/notarget'/></channel>",
        "<redirdev bus='usb' type='spicevmc'/>",
    ],
)
def test_unreachable_or_non_stream_devices_are_skipped(device: str) -> None:
    assert consoles_of(device) == ()


def test_no_devices_at_all() -> None:
    xml = f"<domain type='qemu'><name>bare</name><uuid>{UUID}</uuid></domain>"
    assert parse_domain_xml(xml) == DomainResources("bare", UUID, (), None)


# --- graphics ------------------------------------------------------------------------


def test_vnc_socket_attribute() -> None:
    assert vnc_of("<graphics type='vnc' socket='/run/vnc.sock'/>") == VncTarget(
        "/run/vnc.sock", None, None, None
    )


def test_vnc_listen_socket_element() -> None:
    assert vnc_of(
        "<graphics type='vnc'><listen type='socket' socket='/run/v.sock'/></graphics>"
    ) == VncTarget("/run/v.sock", None, None, None)


def test_vnc_listen_socket_without_path_yet() -> None:
    assert vnc_of("<graphics type='vnc'><listen type='socket'/></graphics>") == VncTarget(
        None, None, None, None
    )


def test_vnc_tcp_from_listen_attribute() -> None:
    assert vnc_of("<graphics type='vnc' port='5901' autoport='no' listen='0.0.0.0'/>") == (
        VncTarget(None, "0.0.0.0", 5901, None)
    )


def test_vnc_tcp_from_listen_address_element() -> None:
    assert vnc_of(
        "<graphics type='vnc' port='5902'><listen type='address' address='::1'/></graphics>"
    ) == VncTarget(None, "::1", 5902, None)


def test_vnc_listen_network_with_resolved_address() -> None:
    assert vnc_of(
        "<graphics type='vnc' port='5903'>"
        "<listen type='network' network='default' address='192.168.122.1'/></graphics>"
    ) == VncTarget(None, "192.168.122.1", 5903, None)


def test_vnc_autoport_not_allocated_yet() -> None:
    assert vnc_of("<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>") == (
        VncTarget(None, "127.0.0.1", None, None)
    )


@pytest.mark.parametrize("port", ["", "abc", "0", "65536", "99999999999", "5900.0", " -5"])
def test_vnc_absurd_port_is_no_port(port: str) -> None:
    vnc = vnc_of(f"<graphics type='vnc' port='{port}' listen='127.0.0.1'/>")
    assert vnc is not None
    assert vnc.port is None


def test_vnc_port_without_listen_address() -> None:
    assert vnc_of("<graphics type='vnc' port='5900'/>") == VncTarget(None, None, 5900, None)


def test_vnc_listen_none() -> None:
    assert vnc_of("<graphics type='vnc'><listen type='none'/></graphics>") == VncTarget(
        None, None, None, None
    )


def test_vnc_password() -> None:
    assert vnc_of(
        "<graphics type='vnc' port='5900' passwd='s3cret'>"
        "<listen type='address' address='127.0.0.1'/></graphics>"
    ) == VncTarget(None, "127.0.0.1", 5900, "s3cret")


def test_first_vnc_graphics_wins_and_spice_is_ignored() -> None:
    devices = (
        "<graphics type='spice' port='5930'/>"
        "<graphics type='vnc' socket='/run/first.sock'/>"
        "<graphics type='vnc' socket='/run/second.sock'/>"
    )
    vnc = vnc_of(devices)
    assert vnc is not None
    assert vnc.socket_path == "/run/first.sock"


def test_no_vnc_graphics() -> None:
    assert vnc_of("<graphics type='spice' autoport='yes'/>") is None
    assert vnc_of("<video><model type='vga'/></video>") is None


# --- rejected documents --------------------------------------------------------------


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "malformed"),
        ("<domain><name>x</name>", "malformed"),
        ("not xml at all", "malformed"),
        (f"<network><name>x</name><uuid>{UUID}</uuid></network>", "<domain>"),
        (f"<domain><uuid>{UUID}</uuid></domain>", "<name>"),
        (f"<domain><name>  </name><uuid>{UUID}</uuid></domain>", "<name>"),
        ("<domain><name>x</name></domain>", "<uuid>"),
        (
            '<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaaaaaaaa">'
            '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><domain><name>&b;</name></domain>',
            "DTD",
        ),
        (
            '<!DOCTYPE domain SYSTEM "file:///etc/passwd"><domain><name>x</name></domain>',
            "DTD",
        ),
    ],
)
def test_bad_documents_raise_libvirt_error(xml: str, message: str) -> None:
    with pytest.raises(LibvirtError, match=message):
        parse_domain_xml(xml)


def test_oversized_document_is_refused_before_parsing() -> None:
    xml = domain("<!--" + "x" * MAX_DOMAIN_XML_LENGTH + "-->")
    with pytest.raises(LibvirtError, match="at most"):
        parse_domain_xml(xml)


def test_errors_belong_to_the_resourced_hierarchy() -> None:
    assert issubclass(LibvirtError, ResourcedError)
    assert issubclass(NoSuchGuest, ResourcedError)


# --- lookup_domain against libvirt's test driver -------------------------------------

TEST_URI = "test:///default"

DEFINED = """\
<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>16</memory>
  <os><type>hvm</type></os>
  <devices>
    <serial type='unix'><source mode='bind' path='/tmp/gw/ser.sock'/><target port='0'/></serial>
    <serial type='pty'><target port='1'/></serial>
    <console type='unix'>
      <source mode='bind' path='/tmp/gw/ser.sock'/><target type='serial' port='0'/>
    </console>
    <console type='unix'>
      <source mode='bind' path='/tmp/gw/hvc.sock'/><target type='virtio' port='1'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/tmp/gw/ga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <graphics type='vnc' port='5907' autoport='no' listen='127.0.0.1' passwd='sekrit'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
</domain>
"""

EXPECTED_CONSOLES = (
    ConsoleSpec("serial0", ConsoleKind.SERIAL, unix("/tmp/gw/ser.sock")),
    ConsoleSpec("console1", ConsoleKind.VIRTIO_CONSOLE, unix("/tmp/gw/hvc.sock")),
    ConsoleSpec("org.qemu.guest_agent.0", ConsoleKind.CHANNEL, unix("/tmp/gw/ga.sock")),
)


@pytest.fixture
def test_conn() -> Iterator[Any]:
    """A test:///default connection (its state lives as long as the connection)."""
    libvirt.registerErrorHandler(lambda *_args: None, None)
    conn = libvirt.open(TEST_URI)
    try:
        yield conn
    finally:
        conn.close()


def test_lookup_the_test_drivers_own_domain() -> None:
    resources = lookup_domain(TEST_URI, "test")
    assert resources == DomainResources(
        name="test", uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", consoles=(), vnc=None
    )


def test_lookup_a_defined_domain_on_an_open_connection(test_conn: Any) -> None:
    defined = test_conn.defineXML(DEFINED.format(name="gw-defined"))
    resources = lookup_domain(TEST_URI, "gw-defined", conn=test_conn)
    assert resources.name == "gw-defined"
    assert resources.uuid == defined.UUIDString()
    # The pty serial has no path in the test driver: skipped, like an inactive domain's.
    assert resources.consoles == EXPECTED_CONSOLES
    # A read-write connection may see secrets: the password comes with the XML.
    assert resources.vnc == VncTarget(None, "127.0.0.1", 5907, "sekrit")
    # The connection we passed stays open for our further use.
    assert test_conn.isAlive() == 1
    defined.create()
    assert lookup_domain(TEST_URI, "gw-defined", conn=test_conn) == resources


def test_lookup_by_uuid(test_conn: Any) -> None:
    defined = test_conn.defineXML(DEFINED.format(name="gw-by-uuid"))
    resources = lookup_domain(TEST_URI, defined.UUIDString(), conn=test_conn)
    assert resources.name == "gw-by-uuid"
    assert resources.consoles == EXPECTED_CONSOLES


def test_missing_domain_is_no_such_guest(test_conn: Any, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(NoSuchGuest, match="no-such-domain"):
        lookup_domain(TEST_URI, "no-such-domain")
    with pytest.raises(NoSuchGuest):
        lookup_domain(TEST_URI, "no-such-domain", conn=test_conn)
    with pytest.raises(NoSuchGuest):
        lookup_domain(TEST_URI, "0a0b0c0d-0000-4000-8000-000000000000", conn=test_conn)
    # libvirt's default handler would have printed "libvirt: ... error" on stderr.
    assert capfd.readouterr().err == ""


def test_undefined_domain_is_gone(test_conn: Any) -> None:
    defined = test_conn.defineXML(DEFINED.format(name="gw-gone"))
    defined.undefine()
    with pytest.raises(NoSuchGuest):
        lookup_domain(TEST_URI, "gw-gone", conn=test_conn)


def test_connection_failure_is_libvirt_error(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LibvirtError, match=r"cannot connect .*nonexistent") as raised:
        lookup_domain("test:///nonexistent/node.xml", "test")
    assert not isinstance(raised.value, NoSuchGuest)
    assert "libvirt: " not in capfd.readouterr().err


def node_file(tmp_path: Path) -> str:
    """A test-driver node file holding one domain with a VNC password; its URI."""
    path = tmp_path / "node.xml"
    domain_xml = DEFINED.format(name="gw-node").replace(
        "<domain type='test'>", "<domain type='test'>\n  <uuid>" + UUID + "</uuid>"
    )
    path.write_text(f"<node>\n{domain_xml}</node>\n")
    return f"test://{path}"


def test_lookup_through_a_uri_of_a_node_file(tmp_path: Path) -> None:
    uri = node_file(tmp_path)
    resources = lookup_domain(uri, "gw-node")
    assert resources.uuid == UUID
    assert resources.consoles == EXPECTED_CONSOLES
    assert resources.vnc == VncTarget(None, "127.0.0.1", 5907, "sekrit")


def test_read_only_connection_falls_back_to_xml_without_secrets(tmp_path: Path) -> None:
    libvirt.registerErrorHandler(lambda *_args: None, None)
    conn = libvirt.openReadOnly(node_file(tmp_path))
    try:
        resources = lookup_domain("test:///node", "gw-node", conn=conn)
    finally:
        conn.close()
    assert resources.consoles == EXPECTED_CONSOLES
    assert resources.vnc == VncTarget(None, "127.0.0.1", 5907, None)
