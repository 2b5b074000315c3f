"""Checks shared by the HIL cases: settle a station, then compare energy three ways.

1. the rig's ground truth (exact energy delivered into each battery),
2. the agent's records as an auditor sees them (`stationctl export`),
3. an independent reference of CONTRACT §6 (tests/metering_reference.py) over the raw
   messages the agent stored.
"""

from __future__ import annotations

from typing import Any

from hil_tests.harness import Agent, Dut, wait_for
from tests.metering_reference import reference_totals


def all_idle(body: dict[str, Any]) -> bool:
    return all(s.get("st", "I") == "I" for s in body.get("slots", []))


def settle(dut: Dut, agent: Agent, timeout: float = 60.0) -> None:
    """Take every battery out, then wait until the agent holds telemetry made after that
    (two consecutive messages showing every slot empty) and its records have caught up."""
    for slot in range(1, dut.slots + 1):
        if dut.rig.model.sample(slot).battery is not None:
            dut.remove(slot)

    def idle_twice() -> bool:
        tel = agent.telemetry(dut.sid)
        return len(tel) >= 2 and all_idle(tel[-1].body) and all_idle(tel[-2].body)

    wait_for(idle_twice, timeout, f"{dut.sid}: telemetry with every slot empty at the agent")
    wait_for(
        lambda: records_match_reference(dut.sid, agent),
        timeout,
        f"{dut.sid}: the agent's records to match the reference over its raw messages",
    )


def reference(sid: str, agent: Agent) -> dict[int, tuple[int, int]]:
    return {slot: v for (s, slot), v in reference_totals(agent.raw(sid)).items() if s == sid}


def records_match_reference(sid: str, agent: Agent) -> bool:
    ref = reference(sid, agent)
    got = agent.credited(sid)
    return bool(ref) and all(got.get(slot, (0, 0)) == v for slot, v in ref.items())


def check_energy(
    dut: Dut, agent: Agent, *, unmetered: dict[int, int] | None = None, slack_periods: int = 0
) -> dict[int, dict[str, int]]:
    """After settle(): per slot, credited + held == the reference, nothing held, and the
    credited energy is the ground truth within the integration bound (less what `unmetered`
    says was knowingly not metered, give or take `slack_periods` sampling periods of the
    slot's top power). Returns the figures per slot."""
    ref = reference(dut.sid, agent)
    got = agent.credited(dut.sid)
    truth = dut.truth()
    bound = dut.bound()
    out = {}
    for slot in range(1, dut.slots + 1):
        credited, held = got.get(slot, (0, 0))
        assert (credited, held) == ref.get(slot, (0, 0)), (slot, got, ref)
        assert held == 0, f"slot {slot}: {held} mWh held as implausible"
        expect = truth[slot] - (unmetered or {}).get(slot, 0)
        if slack_periods:
            bound[slot] += int(slack_periods * dut.dt_s * dut.top_power_w(slot) / 3.6)
        assert abs(credited - expect) <= bound[slot], (
            f"slot {slot}: credited {credited} mWh, ground truth {expect} mWh, "
            f"bound {bound[slot]} mWh"
        )
        out[slot] = {"credited": credited, "truth": truth[slot], "bound": bound[slot]}
    assert not agent.quarantine(dut.sid), agent.quarantine(dut.sid)
    print(f"energy {dut.sid}: {out}")  # the figures, in the HIL log
    return out
