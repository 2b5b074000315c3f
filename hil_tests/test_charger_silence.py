"""Charger silence: a controller that stops answering for longer than the stale window.
The slot's readings are omitted (never repeated as fresh), a `charger_stale` alarm is
raised, the register does not move for the gap, and an `unmetered` alarm says how long
(CONTRACT §3); energy before and after is metered as usual."""

from __future__ import annotations

import re
import time

from hil_tests.checks import check_energy, settle
from hil_tests.conftest import Bench
from hil_tests.harness import wait_for


def test_charger_silence(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    dut = make_dut()
    wait_for(lambda: agent.telemetry(dut.sid), 60, "first telemetry")
    dut.insert(1, power_w=1000, capacity_wh=20.0, soc=0.3)
    wait_for(
        lambda: any(s.get("st") == "C" for s in agent.telemetry(dut.sid)[-1].body["slots"]),
        30,
        "slot 1 charging",
    )
    stale_s = 3  # 5 sampling periods of 0.5 s, rounded up (tools/fleet.py)
    e_on = dut.truth()[1]
    t_on = time.monotonic()
    dut.silence("charger", True)
    wait_for(lambda: agent.alarms(dut.sid, "charger_stale"), 30, "a charger_stale alarm")
    time.sleep(max(0.0, t_on + stale_s + 3 - time.monotonic()))
    silent = [m.body for m in agent.telemetry(dut.sid)][-1]
    assert "st" not in silent["slots"][0] and "mv" not in silent["slots"][0]
    e_off = dut.truth()[1]
    dut.silence("charger", False)
    # the whole line went quiet: every slot goes stale, but only slot 1 was charging
    gap = wait_for(
        lambda: [a for a in agent.alarms(dut.sid, "unmetered") if a.get("slot") == 1],
        30,
        "an unmetered alarm",
    )[0]
    stale = [a for a in agent.alarms(dut.sid, "charger_stale") if a.get("slot") == 1][0]
    assert stale["slot"] == 1 and stale["level"] == "warn"
    assert gap["slot"] == 1
    ms = int(re.search(r"(\d+) ms", gap["msg"]).group(1))  # type: ignore[union-attr]
    assert stale_s * 1000 < ms < (stale_s + 20) * 1000
    wait_for(lambda: "st" in agent.telemetry(dut.sid)[-1].body["slots"][0], 30, "readings back")
    settle(dut, agent)
    # what flowed while the line was silent is knowingly unmetered (plus up to a sampling
    # period on each side of the gap, which the bound covers)
    check_energy(dut, agent, unmetered={1: e_off - e_on}, slack_periods=2)
