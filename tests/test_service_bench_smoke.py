"""The service benchmark still works: both parts run and give sane figures.

Tiny sizes (one activation run each way, 5 guests, 1 s of idle CPU), no timing
assertions: this proves the plumbing (a real demo guest under TCG QEMU behind a
gateway process, fresh private buses with resourced activated by D-Bus, the
in-process gateways with their echoing peers and fake VNC server, the fds from
`Console.Open`, `/proc` readings), not the figures.
"""

from __future__ import annotations

import json

import pytest

from bench.service_bench import ADD_GUEST, CONFIG, Options, format_table, run_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def test_both_parts_give_sane_figures() -> None:
    options = Options(runs=1, guests=5, idle=1.0, settle=0.2, timeout=60.0)
    results = await run_benchmark(options)

    activation = results.activation
    assert activation is not None
    assert activation.cold is not None
    assert [run.way for run in activation.runs] == [ADD_GUEST, CONFIG]
    for run in [activation.cold, *activation.runs]:
        # Each step after the one before it, the first byte after the fd came.
        assert 0 < run.reply_ms <= run.console_ms <= run.open_ms <= run.first_byte_ms
        assert run.echo_ms > 0
        assert 0 < run.imports_ms < run.reply_ms  # the service's own, before it answered
    assert activation.interpreter_ms > 0

    many = results.many
    assert many is not None
    assert many.guests == 5
    assert many.base_rss_kib > 0
    assert many.rss_kib > 0
    assert many.hwm_kib >= many.rss_kib
    assert many.cpu_percent >= 0
    assert many.base_cpu_percent >= 0

    table = format_table(results)
    assert "AddGuest on a fresh bus (N=1)" in table
    assert "guest in config.toml (N=1)" in table
    assert "5 guests, 5 fds open" in table
    document = json.loads(json.dumps(results.to_json()))
    assert document["activation"][ADD_GUEST]["n"] == 1
    assert document["many"]["guests"] == 5
    assert {target["result"] for target in document["targets"]} <= {"PASS", "MISS"}
