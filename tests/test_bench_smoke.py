"""The console benchmark still works: every path runs and gives sane figures.

Tiny sizes (20 echo samples, 1 MiB of bulk, every bulk byte checked), no
libvirt, no timing assertions: this proves the benchmark's plumbing (the demo
guests under TCG QEMU, the gateway subprocesses, the socket peer, our client,
the resourced service activated on a private bus and its `Console.Open` fds),
not the figures. The client -> console bulk direction is left out: it can stall on a
known gateway issue (see bench/README.md, "Findings"), which the full benchmark
reports as a MISS rather than hanging.
"""

from __future__ import annotations

import json

import pytest

from bench.console_bench import (
    DIRECT,
    GATEWAY,
    GATEWAY_BLOCKING,
    MIB,
    RELAY,
    SERVICE,
    Options,
    format_table,
    run_benchmark,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def test_every_path_gives_sane_figures() -> None:
    options = Options(
        samples=20,
        warmup=5,
        block=10,
        bulk_bytes=MIB,
        bulk_rounds=1,
        reverse=False,
        libvirt=False,
        verify=True,
        timeout=60.0,
    )
    results = await run_benchmark(options)

    assert set(results.rtt) == {DIRECT, RELAY, GATEWAY_BLOCKING, GATEWAY, SERVICE}
    for rtt in results.rtt.values():
        assert len(rtt.samples_ns) == 20
        assert all(sample > 0 for sample in rtt.samples_ns)
        # Every byte came back as sent, and nothing else arrived.
        assert rtt.stray_bytes == 0
        summary = rtt.summary()
        assert 0 < summary["min_us"] <= summary["p50_us"] <= summary["p99_us"]

    assert set(results.bulk) == {
        f"{DIRECT}_to_client",
        f"{GATEWAY}_to_client",
        f"{SERVICE}_to_client",
    }
    for bulk in results.bulk.values():
        assert bulk.nbytes == MIB
        assert len(bulk.seconds) == 1
        assert bulk.mb_per_s > 0
    assert not [key for key in results.unavailable if key.startswith("bulk_")]
    assert results.gateway_cpu["us_per_echo"] >= 0  # clock ticks: 0 for so few echoes
    assert results.service_cpu["us_per_echo"] >= 0
    assert "service" not in results.unavailable

    table = format_table(results)
    assert "direct chardev socket" in table
    assert "resourced gateway (subprocess)" in table
    assert "resourced fd (service behind gateway)" in table
    assert "service libvirt: not available (skipped (--no-libvirt))" in table
    assert "targets" in table
    document = json.loads(json.dumps(results.to_json()))
    assert document["rtt"][GATEWAY]["n"] == 20
    assert document["rtt"][SERVICE]["n"] == 20
    assert {target["result"] for target in document["targets"]} <= {"PASS", "MISS"}
