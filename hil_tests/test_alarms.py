"""Alarms: a charger fault on a channel raises `charger_fault` (crit, with the slot and the
code) and the BMS's fault bits `bms_fault`; the session ends as `fault`; once the fault
clears the charge starts again. Alarms reach the agent signed, like any event."""

from __future__ import annotations

from hil_tests.checks import check_energy, settle
from hil_tests.conftest import Bench
from hil_tests.harness import wait_for


def test_alarms(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    dut = make_dut()
    wait_for(lambda: agent.telemetry(dut.sid), 60, "first telemetry")
    dut.insert(1, power_w=1000, capacity_wh=20.0, soc=0.3)
    wait_for(lambda: agent.events(dut.sid, "session_start"), 30, "the session to start")
    dut.set_fault(1, 17)
    a = wait_for(lambda: agent.alarms(dut.sid, "charger_fault"), 30, "a charger_fault alarm")[0]
    assert a["level"] == "crit" and a["slot"] == 1 and "17" in a["msg"]
    b = wait_for(lambda: agent.alarms(dut.sid, "bms_fault"), 30, "a bms_fault alarm")[0]
    assert b["level"] == "crit" and b["slot"] == 1
    end = wait_for(lambda: agent.events(dut.sid, "session_end"), 30, "the session to end")[0]
    assert end["why"] == "fault" and end["slot"] == 1
    tel = wait_for(
        lambda: [m for m in agent.telemetry(dut.sid) if m.body["slots"][0].get("st") == "E"],
        30,
        "state E in telemetry",
    )
    assert tel[-1].body["slots"][0].get("bat", {}).get("flt", 1) != 0
    dut.clear_fault(1)
    wait_for(
        lambda: len(agent.events(dut.sid, "session_start")) >= 2,
        30,
        "the charge to start again once the fault cleared",
    )
    assert len(agent.alarms(dut.sid, "charger_fault")) == 1  # raised once per occurrence
    settle(dut, agent)
    check_energy(dut, agent)
