"""Stale sources: when the meter and the BMS stop answering (the RS-485 cable is pulled),
telemetry omits them once the stale window has passed, never repeating an old reading as
fresh; the meter comes back with the same serial (no meter reset), and slot energy, which
comes from the charger, is untouched (CONTRACT §5.2)."""

from __future__ import annotations

import time

from hil_tests.checks import check_energy, settle
from hil_tests.conftest import Bench
from hil_tests.harness import wait_for


def test_stale_sources(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    dut = make_dut()
    dut.insert(1, power_w=1000, capacity_wh=20.0, soc=0.3)

    def newest() -> dict:  # type: ignore[type-arg]
        t = agent.telemetry(dut.sid)
        return t[-1].body if t else {}

    wait_for(
        lambda: "meter" in newest() and "bat" in newest()["slots"][0],
        60,
        "telemetry with the meter and slot 1's battery",
    )
    sn = newest()["meter"]["sn"]
    t_off = time.monotonic()
    dut.silence("bus", True)
    wait_for(
        lambda: "meter" not in newest() and "bat" not in newest()["slots"][0],
        30,
        "telemetry without the meter and the battery",
    )
    assert time.monotonic() - t_off >= 3 - 1  # not before the stale window (3 s)
    alarm = wait_for(lambda: agent.alarms(dut.sid, "meter_stale"), 30, "a meter_stale alarm")[0]
    assert alarm["level"] == "warn"
    still = newest()["slots"][0]
    assert still.get("st") == "C" and still["ma"] > 0  # the charger still reports
    dut.silence("bus", False)
    wait_for(
        lambda: "meter" in newest() and "bat" in newest()["slots"][0],
        30,
        "the meter and the battery back",
    )
    assert newest()["meter"]["sn"] == sn
    assert agent.events(dut.sid, "meter_reset") == []
    # the bus silence is visible as timeouts, and nothing but timeouts
    err = newest()["err"]
    assert err["mb_to"] > 0 and err["mb_crc"] == err["mb_exc"] == err["mb_addr"] == 0
    settle(dut, agent)
    check_energy(dut, agent)
