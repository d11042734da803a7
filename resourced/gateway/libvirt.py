"""What the gateway needs to know about a libvirt domain: its consoles and its VNC server.

`parse_domain_xml` reads a domain's XML description (pure: no libvirt needed) and
returns a `DomainResources`: the domain's name and UUID, a `ConsoleSpec` for every
character device whose host end the gateway can reach (a Unix socket QEMU listens
on, or a PTY), and where QEMU's VNC server listens (`VncTarget`).
`lookup_domain` fetches that XML from libvirt (the live XML for a running domain,
which is where PTY paths, socket paths and automatically allocated ports appear).

Console mapping, in document order:

* `<serial>` -> `serialN` (SERIAL), N its target port;
* `<console>` whose target is a serial port that a `<serial>` already describes
  is the same device and is skipped; with a `virtio` target -> `consoleN`
  (VIRTIO_CONSOLE); any other target -> `consoleN` (OTHER);
* `<parallel>` -> `parallelN` (PARALLEL);
* `<channel>` with a virtio (or xen) target -> CHANNEL named after the target
  name, e.g. `org.qemu.guest_agent.0` (characters a console name cannot hold
  become `_`).

Only `type='unix'` with `<source mode='bind'>` (QEMU is the server) and
`type='pty'` with a known path are usable; every other type (spicevmc,
qemu-vdagent, file, tcp, a PTY of an inactive domain...) is skipped. QEMU's
monitor is not in the domain XML. Names are made unique with a `-2`, `-3`...
suffix.
"""

from __future__ import annotations

import re
import threading
import uuid as uuid_module
import xml.etree.ElementTree as ET
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from resourced.consoles import (
    MAX_CONSOLE_NAME,
    ConsoleKind,
    ConsoleSpec,
    Endpoint,
    EndpointType,
)
from resourced.errors import ResourcedError

__all__ = [
    "MAX_DOMAIN_XML_LENGTH",
    "DomainResources",
    "LibvirtError",
    "NoSuchGuest",
    "VncTarget",
    "lookup_domain",
    "parse_domain_xml",
]

#: Longest domain XML we parse, in characters. Real ones are a few KiB.
MAX_DOMAIN_XML_LENGTH = 16 * 1024 * 1024

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:@+-]")


class LibvirtError(ResourcedError):
    """libvirt failed (connection, lookup, XML), or its domain XML made no sense."""


class NoSuchGuest(ResourcedError):
    """No domain of that name (or UUID) exists on the libvirt connection."""


@dataclass(frozen=True)
class VncTarget:
    """Where a domain's QEMU VNC server listens.

    `socket_path` is set for a Unix-socket listener; otherwise `host`/`port` are the
    TCP listen address and port as the XML gives them (`host` None if the XML names
    none, `port` None while not yet allocated: an inactive domain with autoport).
    `password` is the `passwd` attribute, present only in XML fetched with
    VIR_DOMAIN_XML_SECURE.
    """

    socket_path: str | None
    host: str | None
    port: int | None
    password: str | None


@dataclass(frozen=True)
class DomainResources:
    """A domain's identity, reachable consoles and VNC server (None: no VNC graphics)."""

    name: str
    uuid: str
    consoles: tuple[ConsoleSpec, ...]
    vnc: VncTarget | None
    #: Console name -> the device's alias in the live XML (`serial0`, `channel1`...),
    #: which `virDomainOpenConsole` takes; absent for an inactive domain.
    aliases: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Parsing (pure)


def parse_domain_xml(xml: str) -> DomainResources:
    """Read the consoles and VNC server of a domain from its XML description.

    Raises LibvirtError if the text is not a plausible domain description
    (malformed, too long, DTD declarations, no `<name>` or `<uuid>`).
    """
    root = _parse(xml)
    name = _required_text(root, "name")
    uuid = _required_text(root, "uuid")
    devices = root.find("devices")
    if devices is None:
        return DomainResources(name, uuid, (), None)
    aliases: dict[str, str] = {}
    return DomainResources(name, uuid, _consoles(devices, aliases), _vnc(devices), aliases)


def _parse(xml: str) -> ET.Element:
    if len(xml) > MAX_DOMAIN_XML_LENGTH:
        raise LibvirtError(
            f"domain XML is {len(xml)} characters long; at most {MAX_DOMAIN_XML_LENGTH} accepted"
        )
    # libvirt never writes a DTD; refusing one rules out entity-expansion tricks.
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise LibvirtError("domain XML with a DTD (<!DOCTYPE>/<!ENTITY>) refused")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise LibvirtError(f"malformed domain XML: {error}") from None
    if root.tag != "domain":
        raise LibvirtError(f"expected a <domain> document, got <{root.tag}>")
    return root


def _required_text(root: ET.Element, tag: str) -> str:
    element = root.find(tag)
    text = (element.text or "").strip() if element is not None else ""
    if not text:
        raise LibvirtError(f"domain XML has no <{tag}>")
    return text


def _int_attr(element: ET.Element | None, attribute: str) -> int | None:
    """An attribute as a non-negative int, None if missing or not a plain number."""
    if element is None:
        return None
    text = (element.get(attribute) or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return int(text)


def _endpoint(device: ET.Element) -> Endpoint | None:
    """The host end of a character device, if the gateway can reach it."""
    kind = device.get("type")
    source = device.find("source")
    if kind == "unix":
        # mode='connect' (libvirt's default) means QEMU is the client: nothing to reach.
        if source is None or source.get("mode") != "bind":
            return None
        path = source.get("path")
        return Endpoint(EndpointType.UNIX, path) if path else None
    if kind == "pty":
        # The live XML has <source path='/dev/pts/N'/> (and tty= on <console>);
        # an inactive domain's PTY has no path yet.
        path = (source.get("path") if source is not None else None) or device.get("tty")
        return Endpoint(EndpointType.PTY, path) if path else None
    return None


def _sanitise(name: str, fallback: str) -> str:
    cleaned = _BAD_NAME_CHARS.sub("_", name)[:MAX_CONSOLE_NAME]
    return cleaned or fallback


def _unique(name: str, taken: set[str]) -> str:
    candidate = name
    number = 2
    while candidate in taken:
        suffix = f"-{number}"
        candidate = name[: MAX_CONSOLE_NAME - len(suffix)] + suffix
        number += 1
    taken.add(candidate)
    return candidate


def _consoles(devices: ET.Element, aliases: dict[str, str]) -> tuple[ConsoleSpec, ...]:
    serial_ports: set[int] = set()
    for index, serial in enumerate(devices.findall("serial")):
        port = _int_attr(serial.find("target"), "port")
        serial_ports.add(index if port is None else port)

    found: list[tuple[str, ConsoleKind, Endpoint, str | None]] = []
    counters = {"serial": 0, "parallel": 0, "console": 0, "channel": 0}
    for device in devices:
        tag = device.tag
        if tag not in counters:
            continue
        index = counters[tag]
        counters[tag] += 1
        target = device.find("target")
        port = _int_attr(target, "port")
        target_type = target.get("type") if target is not None else None
        name: str
        kind: ConsoleKind
        if tag == "serial":
            name, kind = f"serial{index if port is None else port}", ConsoleKind.SERIAL
        elif tag == "parallel":
            name, kind = f"parallel{index if port is None else port}", ConsoleKind.PARALLEL
        elif tag == "console":
            port = index if port is None else port
            # No target type on x86 means a serial console, like libvirt's default.
            if target_type in (None, "serial"):
                if port in serial_ports:
                    continue  # the same device as <serial> port N
                name, kind = f"serial{port}", ConsoleKind.SERIAL
            elif target_type == "virtio":
                name, kind = f"console{port}", ConsoleKind.VIRTIO_CONSOLE
            else:
                name, kind = f"console{port}", ConsoleKind.OTHER
        else:  # channel
            if target_type not in ("virtio", "xen"):
                continue  # guestfwd and friends have no stream for us
            fallback = f"channel{index}"
            target_name = target.get("name") if target is not None else None
            name = _sanitise(target_name, fallback) if target_name else fallback
            kind = ConsoleKind.CHANNEL
        endpoint = _endpoint(device)
        alias = device.find("alias")
        if endpoint is not None:
            found.append((name, kind, endpoint, alias.get("name") if alias is not None else None))

    taken: set[str] = set()
    specs = []
    for name, kind, endpoint, alias_name in found:
        spec = ConsoleSpec(_unique(name, taken), kind, endpoint)
        if alias_name:
            aliases[spec.name] = alias_name
        specs.append(spec)
    return tuple(specs)


def _vnc(devices: ET.Element) -> VncTarget | None:
    graphics = next((g for g in devices.findall("graphics") if g.get("type") == "vnc"), None)
    if graphics is None:
        return None
    socket_path = graphics.get("socket") or None
    host = graphics.get("listen") or None
    for listen in graphics.findall("listen"):
        listen_type = listen.get("type")
        if listen_type == "socket":
            socket_path = socket_path or listen.get("socket") or None
            break
        if listen_type in ("address", "network"):
            host = host or listen.get("address") or None
            break
        if listen_type == "none":
            break
    port = _int_attr(graphics, "port")  # '-1' (not allocated yet) is no port at all
    if port is not None and not 0 < port < 65536:
        port = None
    return VncTarget(
        socket_path=socket_path,
        host=host,
        port=None if socket_path else port,
        password=graphics.get("passwd"),
    )


# ---------------------------------------------------------------------------
# Talking to libvirt

_silenced = False
_silence_lock = threading.Lock()


def _libvirt() -> Any:
    """The libvirt module, with its default error printing to stderr turned off."""
    global _silenced
    import libvirt

    with _silence_lock:
        if not _silenced:
            libvirt.registerErrorHandler(lambda *_args: None, None)
            _silenced = True
    return libvirt


def _message(error: Any) -> str:
    message = error.get_error_message() if hasattr(error, "get_error_message") else None
    return str(message or error)


def _error_code(error: Any) -> int | None:
    code = error.get_error_code() if hasattr(error, "get_error_code") else None
    return code if isinstance(code, int) else None


def lookup_domain(uri: str, name: str, *, conn: Any = None) -> DomainResources:
    """Look a domain up by name (or UUID) and parse its XML description.

    Opens `uri` with `libvirt.open` and closes it again, unless an open
    connection is given as `conn` (then `uri` only labels error messages). The XML
    is fetched with VIR_DOMAIN_XML_SECURE, so a VNC password is included, and
    without it if the connection may not (read-only or denied by an access
    policy). Raises NoSuchGuest if no such domain exists, LibvirtError for any
    other libvirt failure.
    """
    libvirt = _libvirt()
    owned = conn is None
    if owned:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise LibvirtError(f"cannot connect to libvirt at {uri}: {_message(error)}") from None
        if conn is None:  # very old bindings returned None instead of raising
            raise LibvirtError(f"cannot connect to libvirt at {uri}")
    try:
        domain = _find_domain(libvirt, conn, uri, name)
        xml = _xml_description(libvirt, domain, uri, name)
    finally:
        if owned:
            with suppress(libvirt.libvirtError):
                conn.close()
    if not isinstance(xml, str):
        raise LibvirtError(f"libvirt gave no XML description for domain {name!r} at {uri}")
    return parse_domain_xml(xml)


def _looks_like_uuid(text: str) -> bool:
    try:
        uuid_module.UUID(text)
    except ValueError:
        return False
    return True


def _find_domain(libvirt: Any, conn: Any, uri: str, name: str) -> Any:
    no_domain = libvirt.VIR_ERR_NO_DOMAIN
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as error:
        if _error_code(error) != no_domain:
            raise LibvirtError(
                f"cannot look up domain {name!r} at {uri}: {_message(error)}"
            ) from None
    if _looks_like_uuid(name):
        try:
            return conn.lookupByUUIDString(name)
        except libvirt.libvirtError as error:
            if _error_code(error) != no_domain:
                raise LibvirtError(
                    f"cannot look up domain {name!r} at {uri}: {_message(error)}"
                ) from None
    raise NoSuchGuest(f"no domain {name!r} at {uri}")


def _xml_description(libvirt: Any, domain: Any, uri: str, name: str) -> Any:
    denied = {libvirt.VIR_ERR_OPERATION_DENIED, libvirt.VIR_ERR_ACCESS_DENIED}
    try:
        return domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    except libvirt.libvirtError as error:
        if _error_code(error) not in denied:
            raise _xml_error(libvirt, error, uri, name) from None
    # Not allowed to see secrets (read-only connection, access policy): ask without.
    try:
        return domain.XMLDesc(0)
    except libvirt.libvirtError as error:
        raise _xml_error(libvirt, error, uri, name) from None


def _xml_error(libvirt: Any, error: Any, uri: str, name: str) -> ResourcedError:
    if _error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
        return NoSuchGuest(f"domain {name!r} at {uri} went away")
    return LibvirtError(f"cannot get the XML of domain {name!r} at {uri}: {_message(error)}")
