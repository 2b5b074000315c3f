"""Power cut mid-charge (the cabinet goes dark: process kill on the virtual rig, the reset
hook on a real board): the registers come back from flash, the sessions open at the last
save close as `reboot`, the next boot's telemetry carries the restored values, and the
agent's reboot rule (CONTRACT §6 rule 3) loses and doubles nothing."""

from __future__ import annotations

import time
from typing import Any

from hil_tests.checks import check_energy, settle
from hil_tests.conftest import Bench
from hil_tests.harness import wait_for


def test_power_cut(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    dut = make_dut(persist_s=1)  # save every second while energy flows
    wait_for(lambda: agent.telemetry(dut.sid), 60, "first telemetry")
    dut.insert(1, power_w=1200, capacity_wh=20.0, soc=0.3)
    dut.insert(2, power_w=800, capacity_wh=20.0, soc=0.5)
    boots: list[dict[str, Any]] = []
    for _ in range(2):
        n = 2 * (len(boots) + 1)

        def started(n: int = n) -> bool:
            return len(agent.events(dut.sid, "session_start")) >= n

        wait_for(started, 30, "both slots' sessions to start")
        time.sleep(2.5)  # the open sessions are on flash by now
        boot0 = agent.telemetry(dut.sid)[-1].boot
        dut.power_cut(down_s=0.5)

        def booted(b: int = boot0) -> list[dict[str, Any]]:
            return [e for e in agent.events(dut.sid, "boot") if e["boot"] > b]

        ev = wait_for(booted, 60, "the boot after the cut")[0]
        # registers are monotonic for the life of the station: never below the last boot's
        prev = boots[-1]["restored"] if boots else {k: 0 for k in ev["restored"]}
        assert all(ev["restored"][k] > prev[k] for k in prev)
        boots.append(ev)

        def ended(b: int = ev["boot"]) -> list[dict[str, Any]]:
            ends = [e for e in agent.events(dut.sid, "session_end") if e["boot"] == b]
            return ends if {e["slot"] for e in ends} >= {1, 2} else []  # both slots' ends

        ends = wait_for(ended, 30, "both sessions closed as reboot")
        assert {e["why"] for e in ends} == {"reboot"} and {e["slot"] for e in ends} == {1, 2}
    time.sleep(2)
    settle(dut, agent)
    tel = agent.telemetry(dut.sid)
    last = boots[-1]
    assert tel[-1].boot == last["boot"]
    assert {s["n"]: s["b_mwh"] for s in tel[-1].body["slots"]} == {
        int(k): v for k, v in last["restored"].items()
    }
    flags = {f for r in agent.export("interval") if r["sid"] == dut.sid for f in r["flags"]}
    assert "reboot" in flags
    check_energy(dut, agent)


def test_power_cut_right_after_a_session_opens(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    dut = make_dut()  # the board's default: save every 60 s or 10 Wh
    wait_for(lambda: agent.telemetry(dut.sid), 60, "first telemetry")
    dut.insert(1, power_w=1000, capacity_wh=20.0, soc=0.3)
    wait_for(lambda: agent.events(dut.sid, "session_start"), 30, "the session to start")
    time.sleep(1.5)
    dut.power_cut()
    try:
        wait_for(
            lambda: [e for e in agent.events(dut.sid, "session_end") if e["why"] == "reboot"],
            10,
            "the session closed as reboot",
        )
    finally:
        settle(dut, agent)
    check_energy(dut, agent)  # the energy itself is whole either way
