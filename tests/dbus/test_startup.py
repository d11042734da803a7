"""What the service loads before it can answer the call that activated it.

Issue #7 wants activation to the first console byte in 300 ms, and most of that
is Python loading code (`bench/service_bench.py` measures it). Modules that only
some later or rarer path needs are imported there, not when the service starts:
cryptography (VNC Authentication), libvirt (started after the name is owned),
libpulse and our PulseAudio sink (likewise), tomli_w (writing guests.toml),
shutil (installing the unit files; argparse's help formatter imports it too).
This checks, in a fresh interpreter, that `resourced run` loads none of them
before it connects to its bus. It makes no timing assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from resourced.dbus.__main__ import build_parser, parse

#: Modules the service must not load before it runs (see the module docstring).
LATER = (
    "cryptography",
    "libvirt",
    "libvirtmod",
    "libvirtaio",
    "libpulse",
    "resourced.libvirt.follow",
    "resourced.sinks.pulse",
    "tomli_w",
    # argparse's help formatter brings these; `resourced run` needs no parser.
    "shutil",
    "bz2",
    "lzma",
)


def test_the_service_loads_nothing_at_start_it_needs_only_later(tmp_path: Path) -> None:
    # `resourced run` exactly as activation starts it (the bus and directories
    # from the environment), up to its bus connection (a socket that is not
    # there, so it stops there): the imports are those of a real start.
    env = {k: v for k, v in os.environ.items() if k != "DBUS_STARTER_ADDRESS"}
    env |= {
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
    }
    script = (
        "import json, sys\n"
        "from resourced.dbus.__main__ import main\n"
        "sys.argv = ['resourced', 'run']\n"
        "status = main()\n"
        "print(json.dumps([status, sorted(sys.modules)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    status, modules = json.loads(result.stdout)
    assert status == 1, result.stderr  # it did start, and found no bus
    assert "cannot connect to the session bus" in result.stderr
    loaded = set(modules)
    assert {"resourced.config", "resourced.dbus.service"} <= loaded
    assert sorted(loaded.intersection(LATER)) == []


def test_the_activation_command_line_is_parsed_as_the_parser_would() -> None:
    # `parse(["run"])` skips building the parser; it must not differ from it.
    assert vars(parse(["run"])) == vars(build_parser().parse_args(["run"]))
