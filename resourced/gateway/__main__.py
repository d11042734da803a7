"""`resourced-gateway`: run the console gateway in front of a QEMU VNC server.

Example (a guest started with `-vnc unix:/run/vm/vnc.sock -serial
unix:/run/vm/ser.sock,server=on,wait=off -monitor unix:/run/vm/mon.sock,server=on,wait=off`):

    resourced-gateway --vnc unix:/run/vm/vnc.sock --listen 0.0.0.0:5901 \\
        --tls-cert server-cert.pem --tls-key server-key.pem --tls-ca ca-cert.pem \\
        --console serial0=unix:/run/vm/ser.sock --console monitor=unix:/run/vm/mon.sock

or, for a libvirt guest, `--libvirt qemu:///system --domain NAME` instead of
`--vnc` and `--console`. The gateway then follows the domain through libvirt's
events (`resourced.gateway.watch`): when it is started again (new PTY paths, a
new VNC socket or port) or a console device is plugged in or out, it re-reads
the domain's XML, points viewers from then on at the new VNC server, and
publishes or withdraws consoles. SIGHUP re-reads it on demand. The domain's PTY
consoles are opened through libvirt's console API (`LibvirtConsoleSource`), so
that libvirt's arbitration between console sessions applies to the gateway too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import signal
import sys
from pathlib import Path

from resourced.cli import failing_as, read_password_file, run_command
from resourced.consoles import ConsoleKind, ConsoleSpec, EndpointType, parse_console_option
from resourced.consoles.hub import DEFAULT_RING_SIZE, ConsoleHub
from resourced.errors import ConfigurationError, ResourcedError
from resourced.gateway.gateway import DEFAULT_SOCKET_MODE, Gateway, GatewayConfig
from resourced.gateway.libvirt import DomainResources
from resourced.gateway.watch import DomainWatcher
from resourced.libvirt.stream import LibvirtConsoleSource
from resourced.rfb.aio import parse_address
from resourced.rfb.server import ServerSecurity
from resourced.rfb.tls import server_context

log = logging.getLogger("resourced.gateway")

#: Seconds before a domain whose XML lacks a libvirt console is looked at again.
RECHECK_DELAY = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resourced-gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vnc", help="QEMU's VNC server: unix:PATH or HOST::PORT")
    parser.add_argument("--vnc-password-file", type=Path, help="password of QEMU's VNC server")
    parser.add_argument(
        "--listen",
        action="append",
        required=True,
        help="where viewers connect: unix:PATH or HOST:PORT (repeatable)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_octal_mode,
        default=DEFAULT_SOCKET_MODE,
        metavar="MODE",
        help=f"permissions of unix: listening sockets, in octal (default {DEFAULT_SOCKET_MODE:o}: "
        "the owner only; 660 lets --socket-group in)",
    )
    parser.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group of unix: listening sockets (a name or a number)",
    )
    parser.add_argument(
        "--console",
        action="append",
        default=[],
        metavar="NAME[:KIND]=unix:PATH|pty:PATH",
        help="a guest console to publish (repeatable); KIND is guessed from NAME if omitted",
    )
    parser.add_argument("--libvirt", metavar="URI", help="find VNC and consoles via libvirt")
    parser.add_argument("--domain", help="the libvirt domain (with --libvirt)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM): enables TLS")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-ca", type=Path, help="CA that client certificates must chain to")
    parser.add_argument("--password-file", type=Path, help="VNC password viewers must give")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow TCP listening without TLS and password (only for trusted networks)",
    )
    parser.add_argument(
        "--history",
        type=_positive_int,
        default=DEFAULT_RING_SIZE,
        help=f"bytes of recent output kept per console (default {DEFAULT_RING_SIZE})",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="seconds a viewer has for the handshake steps it takes on its own (default 30)",
    )
    parser.add_argument(
        "--auth-timeout",
        type=_seconds,
        metavar="S",
        help="seconds to wait for a viewer's user to answer (the VNC password, a look at "
        "the certificate); default: no limit, as QEMU",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _read_secret(path: Path | None) -> str | None:
    return None if path is None else read_password_file(path)


def server_security(args: argparse.Namespace) -> ServerSecurity:
    context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        context = server_context(args.tls_cert, args.tls_key, args.tls_ca)
    elif args.tls_ca:
        raise ConfigurationError("--tls-ca needs --tls-cert and --tls-key")
    password = _read_secret(args.password_file)
    secured = context is not None or password is not None
    tcp = [address for address in args.listen if not address.startswith("unix:")]
    if tcp and not secured and not args.insecure:
        raise ConfigurationError(
            f"refusing to listen on TCP ({', '.join(tcp)}) without TLS or a password; "
            "give --tls-cert/--tls-key and/or --password-file, or --insecure"
        )
    return ServerSecurity(vnc_password=password, tls_context=context, allow_none=not secured)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} seconds is not a time limit")
    return seconds


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} is outside 0..777")
    return mode


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive size")
    return value


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigurationError(f"no group named {name!r}") from None


def _through_libvirt(spec: ConsoleSpec, resources: DomainResources) -> bool:
    """Whether the console is reached through libvirt's console API: a PTY that
    libvirt names, of a `<serial>`, `<console>` or `<parallel>`. A chardev socket
    has no arbitration to honour, and is reached directly. So is a `<channel>`
    on a PTY: `virDomainOpenConsole` does not find channels and
    `virDomainOpenChannel` takes only Unix sockets, so no libvirt client can
    open it; its PTY is opened under libvirt's lock file, as `pty:` is."""
    return (
        spec.endpoint.type is EndpointType.PTY
        and spec.kind is not ConsoleKind.CHANNEL
        and spec.name in resources.aliases
    )


def _libvirt_hub_matches(hub: ConsoleHub, spec: ConsoleSpec, resources: DomainResources) -> bool:
    """Whether a console hub already reaches `spec` (a restarted domain's PTYs have
    new paths, but a libvirt console is the same device under the same alias)."""
    if isinstance(hub.source, LibvirtConsoleSource):
        return (
            _through_libvirt(spec, resources)
            and hub.source.device == resources.aliases[spec.name]
            and hub.kind is spec.kind
        )
    return not _through_libvirt(spec, resources) and hub.spec == spec


async def _add_libvirt_console(
    gateway: Gateway, watcher: DomainWatcher, spec: ConsoleSpec, resources: DomainResources
) -> None:
    """Publish a console reached through libvirt (`virDomainOpenConsole`), so that
    libvirt's arbitration applies: `virsh console` is refused while we hold it, and
    if someone forces it away the console's viewers are told and we take it again,
    without forcing, once they are done. Held for the gateway's lifetime."""
    from resourced.gateway.libvirt import _libvirt

    source = LibvirtConsoleSource(
        _libvirt(),
        lambda: watcher.conn,
        watcher.domain,
        resources.aliases[spec.name],
        idle_timeout=0.0,  # never released
    )
    await gateway.add_console(spec, source)
    source.hold()


def _upstream_and_consoles(
    resources: DomainResources, domain: str
) -> tuple[str, str | None, list[ConsoleSpec]]:
    if resources.vnc is None:
        raise ConfigurationError(f"domain {domain} has no VNC graphics")
    vnc = resources.vnc
    if vnc.socket_path:
        address = f"unix:{vnc.socket_path}"
    elif vnc.port:
        address = f"{vnc.host or 'localhost'}::{vnc.port}"
    else:
        raise ConfigurationError(f"domain {domain}'s VNC server has no address yet (not running?)")
    return address, vnc.password, list(resources.consoles)


async def run(args: argparse.Namespace) -> None:
    consoles = [parse_console_option(text) for text in args.console]
    upstream = args.vnc
    upstream_password = _read_secret(args.vnc_password_file)
    resources: DomainResources | None = None
    through_libvirt: list[ConsoleSpec] = []
    if args.libvirt:
        if not args.domain:
            raise ConfigurationError("--libvirt needs --domain")
        from resourced.gateway.libvirt import lookup_domain

        resources = lookup_domain(args.libvirt, args.domain)
        address, password, found = _upstream_and_consoles(resources, args.domain)
        upstream = upstream or address
        upstream_password = upstream_password or password
        named = {spec.name for spec in consoles}
        for spec in found:
            if spec.name not in named:
                listed = through_libvirt if _through_libvirt(spec, resources) else consoles
                listed.append(spec)
    if not upstream:
        raise ConfigurationError("say where QEMU's VNC server is: --vnc or --libvirt/--domain")
    parse_address(upstream)  # a bad --vnc is said now, not to each viewer later
    config = GatewayConfig(
        upstream=upstream,
        upstream_password=upstream_password,
        security=server_security(args),
        consoles=consoles,
        history=args.history,
        handshake_timeout=args.handshake_timeout,
        auth_timeout=args.auth_timeout,
    )
    group = _group_id(args.socket_group)
    gateway = Gateway(config)
    watcher: DomainWatcher | None = None
    rechecking: set[str] = set()  # libvirt consoles kept for one more look (_reload)
    if args.libvirt:
        # Started after the first lookup: from here on libvirt's calls go
        # through the watcher's thread, where libvirt's event loop runs.
        watcher = DomainWatcher(
            args.libvirt,
            args.domain,
            lambda resources: _reload(gateway, args, watcher, resources, rechecking),
        )
        watcher.start()
        assert resources is not None
        for spec in through_libvirt:
            await _add_libvirt_console(gateway, watcher, spec, resources)
    await gateway.start()
    try:
        for address in args.listen:
            if address.startswith("unix:"):
                with failing_as(f"cannot listen on {address}"):
                    await gateway.listen_unix(address[5:], mode=args.socket_mode, group=group)
            else:
                host, _, port = address.rpartition(":")
                if not host or not port.isdigit():
                    raise ConfigurationError(
                        f"--listen wants unix:PATH or HOST:PORT, not {address}"
                    )
                with failing_as(f"cannot listen on {address}"):
                    await gateway.listen_tcp(host.strip("[]"), int(port))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if watcher is not None:
            loop.add_signal_handler(signal.SIGHUP, watcher.refresh)
        names = ", ".join(
            [f"{s.name} ({s.endpoint})" for s in consoles]
            + [f"{s.name} (libvirt console)" for s in through_libvirt]
        )
        # Said once the signals are ours: from here on SIGTERM is a clean stop.
        log.info("gateway: fronting %s; consoles: %s", upstream, names or "none")
        await stop.wait()
    finally:
        if watcher is not None:
            await watcher.close()
        await gateway.close()


async def _reload(
    gateway: Gateway,
    args: argparse.Namespace,
    watcher: DomainWatcher | None,
    resources: DomainResources,
    rechecking: set[str],
) -> None:
    """Follow the libvirt domain: where its VNC server now is (for viewers from now
    on), and the consoles it gained or lost (a restart gives PTYs new paths).

    Right after a start the live XML may not show a PTY's path yet, so a console
    reached through libvirt that the XML lacks is kept, and the domain looked at
    again RECHECK_DELAY later (`rechecking` names those); only if it is still
    missing then is it withdrawn. Viewers keep the console (its id, an open
    session) across a restart instead of seeing it removed and added again."""
    try:
        address, password, found = _upstream_and_consoles(resources, args.domain)
    except ResourcedError as err:
        log.info("gateway: domain %s not usable now (%s); keeping what we have", args.domain, err)
        return
    config = gateway.config
    if not args.vnc and address != config.upstream:
        log.info("gateway: domain %s's VNC server is now at %s", args.domain, address)
        config.upstream = address
    if not args.vnc_password_file:
        config.upstream_password = password
    fixed = {parse_console_option(text).name for text in args.console}
    current = {hub.name: hub for hub in gateway.hubs.values()}
    wanted = {spec.name: spec for spec in found}
    rechecking &= set(current) - set(wanted)  # found again: no longer waiting
    for name, hub in current.items():
        spec = wanted.get(name)
        if name in fixed:
            continue
        if (
            spec is None
            and watcher is not None
            and isinstance(hub.source, LibvirtConsoleSource)
            and name not in rechecking
        ):
            rechecking.add(name)
            asyncio.get_running_loop().call_later(RECHECK_DELAY, watcher.refresh)
            continue
        if spec is None or not _libvirt_hub_matches(hub, spec, resources):
            rechecking.discard(name)
            await gateway.remove_console(name)
    for name, spec in wanted.items():
        existing = current.get(name)
        if name in fixed or (
            existing is not None and _libvirt_hub_matches(existing, spec, resources)
        ):
            continue
        with contextlib.suppress(ConfigurationError):
            if watcher is not None and _through_libvirt(spec, resources):
                await _add_libvirt_console(gateway, watcher, spec, resources)
            else:
                await gateway.add_console(spec)
    log.info("gateway: reloaded consoles from libvirt")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )

    def body() -> int:
        asyncio.run(run(args))
        return 0

    return run_command("resourced-gateway", body)


if __name__ == "__main__":
    sys.exit(main())
