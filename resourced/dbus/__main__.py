"""`resourced`: run the D-Bus session service, or install its activation files.

resourced run [--bus ADDRESS] [--config-dir DIR] [--idle-exit SECONDS] [-v]
resourced install-user-service [--prefix DIR]

This module imports next to nothing itself: the service's code is loaded once
the command line is parsed, with the cyclic garbage collector paused meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from resourced.cli import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resourced", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the service on the session bus")
    run.add_argument("--bus", help="bus address (default: the session bus that started us)")
    run.add_argument("--config-dir", type=Path, help="instead of ~/.config/resourced")
    run.add_argument(
        "--idle-exit", type=float, help="seconds unused before exiting (0 = never; default: config)"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    install = commands.add_parser(
        "install-user-service", help="write the D-Bus activation file and systemd user unit"
    )
    install.add_argument("--prefix", type=Path, help="write under DIR/dbus-1 and DIR/systemd")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, parsed. `resourced run` alone, as the activation file and
    the systemd unit run it, is known without building the parser: argparse's
    help formatter imports shutil, bz2 and lzma, 3 % of an activation's work."""
    if argv == ["run"]:
        return argparse.Namespace(
            command="run", bus=None, config_dir=None, idle_exit=None, verbose=False
        )
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="resourced: %(levelname)s: %(message)s",
    )
    return run_command("resourced", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    # Loading these is most of an activation's time (issue #7 wants the first
    # console byte 300 ms after the activating call). It makes many objects and
    # no garbage, so the collector's passes over them (a few percent of it)
    # are skipped; frozen afterwards, they are skipped by later collections too.
    with _collector_paused():
        from resourced import config as config_module
        from resourced.dbus.service import install_user_service, run
    if args.command == "install-user-service":
        for path in install_user_service(args.prefix):
            print(f"wrote {path}")
        return 0
    config = config_module.load(args.config_dir)
    if args.idle_exit is not None:
        config = dataclasses.replace(config, idle_exit=args.idle_exit)
    return run(config, bus_address=args.bus)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


if __name__ == "__main__":
    sys.exit(main())
