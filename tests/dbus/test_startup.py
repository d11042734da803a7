"""What the service loads before it can answer the call that activated it.

Issue #7 wants activation to the first console byte in 300 ms, and most of that
is Python loading code (`bench/service_bench.py` measures it). Modules that only
some later or rarer path needs are imported there, not when the service starts:
cryptography (VNC Authentication), libvirt (started after the name is owned),
libpulse and our PulseAudio sink (likewise), tomli_w (writing guests.toml).
This checks, in a fresh interpreter, that importing the service's entry module
loads none of them. It makes no timing assertion.
"""

from __future__ import annotations

import json
import subprocess
import sys

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
)


def test_the_service_entry_module_loads_nothing_it_needs_only_later() -> None:
    script = (
        "import json, sys\nimport resourced.dbus.__main__\nprint(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(result.stdout))
    assert "resourced.dbus.service" in loaded  # the import did happen
    assert sorted(loaded.intersection(LATER)) == []
