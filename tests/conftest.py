"""Fixtures shared by the test packages.

`system_conn` is an open `qemu:///system` connection to the machine's real
libvirtd, started as root if need be (`tests.libvirtd`); without libvirtd the
test fails, naming what is missing. A test module may define its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.libvirtd import SYSTEM_URI, LibvirtdUnavailable, ensure_libvirtd


@pytest.fixture(scope="module")
def system_conn() -> Iterator[Any]:
    import libvirt

    try:
        ensure_libvirtd()
    except LibvirtdUnavailable as error:
        pytest.fail(f"no libvirtd to test against: {error}", pytrace=False)
    libvirt.registerErrorHandler(lambda *_args: None, None)
    conn = libvirt.open(SYSTEM_URI)
    try:
        yield conn
    finally:
        conn.close()
