"""Broker outage: while the broker is down the station keeps sampling and signing into its
flash outbox (messages made offline carry `hist`); when it is back, every message arrives,
none twice in the records, and the energy is whole."""

from __future__ import annotations

import time

from hil_tests.checks import check_energy, settle
from hil_tests.conftest import Bench
from hil_tests.harness import wait_for


def test_broker_outage(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    dut = make_dut()
    wait_for(lambda: agent.telemetry(dut.sid), 60, "first telemetry")
    dut.insert(1, power_w=1000, capacity_wh=20.0, soc=0.3)
    wait_for(
        lambda: any(s.get("st") == "C" for s in agent.telemetry(dut.sid)[-1].body["slots"]),
        30,
        "slot 1 charging",
    )
    before = len(agent.raw(dut.sid))
    mark = max((m.boot, m.seq) for m in agent.raw(dut.sid))
    bench.broker.stop()
    time.sleep(6)  # ~6 telemetry periods made offline
    bench.broker.start()
    try:
        hist = wait_for(
            lambda: (
                [
                    m
                    for m in agent.raw(dut.sid)
                    if m.body.get("hist") == 1 and (m.boot, m.seq) > mark and m.kind == "telemetry"
                ]
                if len(agent.raw(dut.sid)) > before + 6
                else None
            ),
            60,
            "the messages made during the outage",
        )
        assert len(hist) >= 3
        assert all(m.kind in ("telemetry", "event") for m in hist)
        settle(dut, agent)
    finally:
        wait_for(lambda: bench.agent.alive(), 5, "the agent still running")
    raw = agent.raw(dut.sid)
    assert len(raw) > before
    for boot in {m.boot for m in raw}:  # no message lost: every boot's seq is 0..n
        seqs = sorted(m.seq for m in raw if m.boot == boot)
        assert seqs == list(range(len(seqs))), f"boot {boot}: seq gaps"
    check_energy(dut, agent)
